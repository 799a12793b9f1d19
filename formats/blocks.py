"""Block sizes, one table: every module takes its block size from here.

Sources: DeepSeek V3 ``inference/kernel.py`` (FP8 weights, 128 x 128 blocks, ``block_size = 128``); OCP
Microscaling Formats v1.0 (MX: 32 elements share one E8M0 scale); NVIDIA NVFP4 (16 elements share one E4M3
scale); ggml ``ggml-common.h`` (``QK8_0 = QK4_0 = QK_MXFP4 = 32``; K-quants ``QK_K = 256``).
"""

FP8_BLOCK = 128       # DeepSeek FP8 weight block: rows and columns share one scale
MXFP4_BLOCK = 32      # MXFP4 (OCP MX): elements along K per E8M0 scale (V4's native FP4 experts)
NVFP4_BLOCK = 16      # NVFP4: elements along K per E4M3 scale
GGUF_QK = 32          # ggml Q8_0 / Q4_0 / MXFP4 elements per block
GGUF_QK_K = 256       # ggml K-quants (Q4_K, Q6_K, ...) elements per super-block
