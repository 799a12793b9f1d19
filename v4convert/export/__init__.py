"""Exporters: one package or module per output format (``onnx/`` today; the registry lands with issue #10)."""
