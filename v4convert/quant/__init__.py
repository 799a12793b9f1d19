"""Quantization: plan (headers only) -> engine (streaming, resumable) -> workers (one unit each), recipes."""
