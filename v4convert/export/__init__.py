"""Exporters to other runtimes' formats."""
