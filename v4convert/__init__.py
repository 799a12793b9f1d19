"""v4convert: convert and quantize DeepSeek checkpoints, and verify every artifact."""
__version__ = "0.1.0"
