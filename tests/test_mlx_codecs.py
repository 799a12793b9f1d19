"""MLX's packed layouts (formats/mlx_quant.py) against MLX itself (mx.quantize / mx.dequantize, mlx 0.32.4).

Every encoder is byte-identical to ``mx.quantize`` on the same float input (affine 4/8-bit in each group
size and in float32 and bfloat16; mxfp4; nvfp4), every decoder equals ``mx.dequantize`` exactly, and V4's
native MXFP4 experts re-pack into MLX ``mxfp4`` with the same bytes and the same values (lossless).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from v4convert.formats import mlx_quant as mq
from v4convert.formats.mlx_quant import MLXMode, MLXPacked, MLXQuant

from v4convert.checkpoint import Checkpoint
from v4convert.export.mlx import MLXExportError, parse_spec
from v4convert.families.roles import Storage

TINY_V4 = Path(__file__).resolve().parents[1] / "v4convert" / "data" / "tiny-v4"


def _weights(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Odd rows, mixed magnitudes, one all-positive row, one all-zero group, one constant row, exact ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.logspace(-3, 0, rows)[:, None]
    w[1] = w[1].abs() + 0.01
    w[2, :32] = 0.0
    w[3] = 0.125
    w[4, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])    # E2M1 rounding bounds (ties)
    w[4, 8:16] = -w[4, :8]
    w[4, 16:24] = w[4, :8] * (1 + 2.0 ** -20)                                  # just past them
    w[5, :16] = torch.tensor([-1e-9, -0.0] * 8)                                 # negatives that round to 0
    return w


def _mx(worker, w: torch.Tensor, q: MLXQuant, dtype: str) -> MLXPacked:
    src = worker.file("w.npy")
    np.save(src, w.numpy())
    out = worker.file("q")
    worker.call("quantize", w=src, mode=q.mode.value, bits=q.bits, group_size=q.group_size, dtype=dtype, out=out)
    s = torch.from_numpy(np.load(out + ".scales.npy"))
    b = torch.from_numpy(np.load(out + ".biases.npy")) if q.mode is MLXMode.AFFINE else None
    return MLXPacked(torch.from_numpy(np.load(out + ".weight.npy")), s, b)


def _mx_dequant(worker, p: MLXPacked, q: MLXQuant, dtype: str) -> torch.Tensor:
    names = {}
    for part in ("weight", "scales", "biases"):
        t = getattr(p, part)
        if t is None:
            continue
        t = t.view(torch.uint8) if part == "weight" or t.dtype == torch.uint8 else t.to(torch.float32)
        names[part] = worker.file(f"d.{part}.npy")
        np.save(names[part], t.numpy())
    out = worker.file("d.out.npy")
    worker.call("dequantize", mode=q.mode.value, bits=q.bits, group_size=q.group_size, dtype=dtype, out=out, **names)
    return torch.from_numpy(np.load(out))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 64), (8, 128), (4, 128)])
def test_affine_bytes_match_mlx(mlx_worker, bits, group, dtype):
    w = _weights(11, 384)
    q = MLXQuant(MLXMode.AFFINE, bits, group)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ours = mq.affine_quantize(w, bits, group, tdt)
    ref = _mx(mlx_worker, w, q, dtype)
    assert torch.equal(ours.weight.view(torch.uint8), ref.weight)
    assert torch.equal(ours.scales.to(torch.float32), ref.scales)
    assert torch.equal(ours.biases.to(torch.float32), ref.biases)
    assert torch.equal(mq.decode(ours, q), _mx_dequant(mlx_worker, ours, q, dtype))


@pytest.mark.parametrize("mode", [MLXMode.MXFP4, MLXMode.NVFP4])
def test_fp4_bytes_match_mlx(mlx_worker, mode):
    w = _weights(9, 160, seed=1)
    q = parse_spec(mode.value)
    ours = mq.encode(w, q, torch.float32)
    ref = _mx(mlx_worker, w, q, "float32")
    assert torch.equal(ours.weight, ref.weight)
    assert torch.equal(ours.scales, ref.scales)
    assert torch.equal(mq.decode(ours, q), _mx_dequant(mlx_worker, ours, q, "float32"))


def test_v4_mxfp4_experts_repack_bit_exact(mlx_worker):
    """V4's native experts (I8 E2M1 pairs + E8M0 per 32) -> MLX mxfp4: same bytes, and MLX's own dequantize
    gives exactly our checkpoint reader's values."""
    with Checkpoint.open(TINY_V4) as ck:
        experts = [i for i in ck.infos() if i.expert is not None and i.storage is Storage.MXFP4]
        assert experts
        q = parse_spec("mxfp4")
        for info in experts[:: max(1, len(experts) // 6)]:
            raw = ck.raw(info.name)
            p = mq.mxfp4_repack(raw["weight"], raw["scale"], info.name)
            assert torch.equal(p.weight, raw["weight"].contiguous().view(torch.uint8))
            assert torch.equal(p.scales, raw["scale"].contiguous().view(torch.uint8))
            exact = ck.dequantize(info.name)
            assert torch.equal(mq.decode(p, q), exact)
            assert torch.equal(_mx_dequant(mlx_worker, p, q, "float32"), exact), info.name


def test_row_length_must_be_whole_groups():
    with pytest.raises(mq.MLXCodecError, match="multiple of 32"):
        mq.mxfp4_encode(torch.ones(4, 48))
    with pytest.raises(mq.MLXCodecError, match="affine needs"):
        mq.affine_quantize(torch.ones(4, 64), 3, 64, torch.float32)


@given(st.text(max_size=20))
def test_parse_spec_accepts_or_refuses_cleanly(text):
    try:
        q = parse_spec(text)
    except MLXExportError as e:
        assert "unknown MLX quantization" in str(e)
        return
    if q is not None:
        q.check()


@pytest.mark.parametrize("text,want", [("affine4", (MLXMode.AFFINE, 4, 64)), ("AFFINE8-g128", (MLXMode.AFFINE, 8, 128)),
                                       ("mxfp4", (MLXMode.MXFP4, 4, 32)), ("nvfp4", (MLXMode.NVFP4, 4, 16))])
def test_parse_spec_values(text, want):
    q = parse_spec(text)
    assert (q.mode, q.bits, q.group_size) == want
    assert parse_spec("none") is None
