"""Artifact runners for ``verify`` (``onnx.py`` today; the registry lands with issue #10)."""
