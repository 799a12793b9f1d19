#!/usr/bin/env bash
# The MLX consumer for tests/test_mlx_*.py: mlx (CPU build) + mlx-lm from PyPI in their own venv outside the
# repo (~/.cache/v4convert-ci/mlx-venv, what v4convert.artifacts.mlx looks for), created once and reused.
# Pinned to the versions the exporter's names and layouts were checked against (export/mlx.py MLX_LM_CHECKED).
set -euo pipefail
VENV="${V4CONVERT_MLX_VENV:-$HOME/.cache/v4convert-ci/mlx-venv}"
PKGS=("mlx[cpu]==0.32.4" "mlx-lm==0.32.2")
if "$VENV/bin/python" -c "import mlx.core, mlx_lm; assert mlx_lm.__version__ == '0.32.2'" >/dev/null 2>&1; then
    exit 0
fi
rm -rf "$VENV"
python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PKGS[@]}"
"$VENV/bin/python" -c "import mlx.core as mx; assert int(mx.array([1, 2]).sum()) == 3"
