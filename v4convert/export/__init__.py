"""Exporters, one module per output format (registry owned by the architecture)."""
