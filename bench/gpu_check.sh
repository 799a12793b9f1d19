#!/usr/bin/env bash
# GPU check of the Triton kernels (issue 7) -- one command on a machine with a CUDA GPU:
#
#     bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ./gpu_check_out
#
# 1. installs this package (editable, no build isolation, no dependency resolution: torch with CUDA and
#    triton must already be there, as on any GPU image) and, only if missing, the test extras it imports;
# 2. runs tests/test_kernels.py with V4CONVERT_KERNEL_DEVICE=cuda: every kernel compiled on the GPU (no
#    interpreter; bf16/fp16 activations use bf16/fp16 tensor-core dots) against the CPU references;
# 3. runs bench/kernel_speed.py (all DeepSeek shapes, M = 1,4,16,64,256): Triton vs torch bf16 matmul of the
#    dequantized weight, GB/s of weight bytes, TFLOP/s and % of HBM bandwidth (HBM_GBS, default 4800 = H200;
#    use 3350 for an H100 SXM).
# Both steps are capped by `timeout` so the whole script stays under 6 minutes (tests 200 s, bench 130 s);
# logs and the table land in OUT_DIR (tests.log, kernels_table.txt, env.txt). Exit status: non-zero if the
# tests fail or time out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1

python - <<'EOF' > "$OUT/env.txt" 2>&1
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
cat "$OUT/env.txt"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device"; exit 2; }

python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed (continuing with the source tree on PYTHONPATH)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for mod in pytest ml_dtypes safetensors numpy click psutil; do
  python -c "import $mod" 2>/dev/null || python -m pip install -q "$mod" || echo "could not install $mod"
done

echo "== kernel tests on CUDA"
V4CONVERT_KERNEL_DEVICE=cuda timeout 200 python -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}

echo "== bench/kernel_speed.py"
timeout 130 python bench/kernel_speed.py --hbm-gbs "${HBM_GBS:-4800}" 2>&1 | tee "$OUT/kernels_table.txt"

echo "tests exit status: $rc (124 = timed out)"
exit "$rc"
