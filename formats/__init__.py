"""Bytes on disk: FP4/FP8 codecs, safetensors I/O and artifact writers. No model math.

Imported as ``v4convert.formats``; imports nothing of ours but its own codecs.
"""
