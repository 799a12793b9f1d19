"""Exporters: one module per output format (``sharded`` so far; the registry lands with the arch refactor)."""
