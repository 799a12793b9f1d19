#!/usr/bin/env bash
# The peers venv for bench/peers.py (llm-compressor, AutoRound, ModelOpt rows), outside the repo so the peers'
# pins never leak into the package or its test extra. Idempotent: re-running reinstalls nothing already pinned.
# --system-site-packages reuses the machine's CPU torch; torch==2.13.0 is in the same pip command so no resolver
# step can swap in a CUDA build.
#   bash bench/peers_venv.sh            # -> ~/.cache/v4convert-ci/peers-venv (override: PEERS_VENV=DIR)
set -euo pipefail
VENV="${PEERS_VENV:-$HOME/.cache/v4convert-ci/peers-venv}"
# auto-round 0.15.1: llmcompressor 0.14.0.1 requires auto-round>=0.14.1,<=0.15.1
PINS=(torch==2.13.0 llmcompressor==0.14.0.1 auto-round==0.15.1 nvidia-modelopt==0.47.0)
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
if "$VENV/bin/python" - "${PINS[@]}" <<'PY'
import sys, importlib.metadata as m
for pin in sys.argv[1:]:
    name, ver = pin.split("==")
    try:
        have = m.version(name)
    except m.PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != ver:
        sys.exit(1)
PY
then
    echo "peers venv ready: $VENV"
    exit 0
fi
"$VENV/bin/pip" install --disable-pip-version-check -q "${PINS[@]}"
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, torch.version.cuda"
"$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|transformers|llmcompressor|compressed-tensors|auto-round|nvidia-modelopt) '
echo "peers venv ready: $VENV"
