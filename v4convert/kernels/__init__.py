"""Triton kernels and, beside each, its plain-PyTorch reference (the CPU path).

Imported as ``v4convert.kernels``. Triton is imported lazily by the modules that launch kernels,
so the CPU runtime never needs it: ``packed`` (packed weights + tiled CPU linear), ``gemm`` (W4A16 /
FP8-block GEMM), ``moe`` (sorted grouped expert GEMM), ``quant`` (NVFP4 quantization).
"""
