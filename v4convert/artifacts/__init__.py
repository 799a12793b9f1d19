"""Artifact runners for ``verify`` (registry owned by the architecture; see ``v4convert/artifact.py``)."""
