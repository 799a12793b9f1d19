"""The runtime's logits with packed execution (``v4convert.kernels.packed``, CPU tiled path) vs dequantized
execution, float32, on tiny artifacts: FP8-block attention (E8M0 scales) + MXFP4 experts (V4-Flash as
published) and NVFP4 experts in compressed-tensors form with FP8-block attention (F32 scales) (``v4convert
quantize`` of V3).

The runtime has no packed ``Linear`` yet, so each quantized linear is switched here through public attributes:
its dense ``weight`` is removed (any use of it would fail) and its ``forward`` / ``dense_weight`` read the
packed weight. The hook the runtime needs instead is named in ``pack_linears``' docstring.
"""
from __future__ import annotations

import types

import pytest
import torch

from v4convert.checkpoint import Checkpoint
from v4convert.kernels.packed import Codec, PackedWeight, from_checkpoint, packed_linear
from v4convert.runtime import load
from v4convert.runtime.common import FakeQuant, Linear, fake_quant_fp8_act


def pack_linears(model: torch.nn.Module, ck: Checkpoint, rename) -> dict[Codec, int]:
    """Switch every ``Linear`` whose checkpoint weight is stored quantized to packed execution.

    What ``runtime/common.py`` would do natively: ``Linear.packed: PackedWeight | None``; ``forward`` ->
    ``packed_linear(x, self.packed, self.bias)`` (after the opt-in fake-quant); ``dense_weight()`` ->
    ``self.packed.dequantize()``; and ``fill_from_checkpoint(..., packed=True)`` calling
    ``kernels.packed.from_checkpoint(ck, name)`` instead of ``ck.dequantize(name)`` for those weights.
    """
    counts: dict[Codec, int] = {}
    for name in ck.names():
        info = ck.tensor_info(name)
        if not info.storage.is_quantized:
            continue
        target = rename(name)
        mod = model.get_submodule(target[: -len(".weight")])
        assert isinstance(mod, Linear), f"{name}: quantized weight outside a Linear ({type(mod).__name__})"
        pw = from_checkpoint(ck, name)
        dtype = mod.weight.dtype
        mod.weight = None                                       # the dense copy is gone: no silent dense path

        def forward(self, x, pw=pw):
            if self.fake_quant is not FakeQuant.NONE and self.in_features % 128 == 0:
                x = fake_quant_fp8_act(x, pow2_scale=self.fake_quant is FakeQuant.FP8_BLOCK_UE8M0)
            return packed_linear(x, pw, self.bias)

        mod.forward = types.MethodType(forward, mod)
        mod.dense_weight = lambda pw=pw, dtype=dtype: pw.dequantize().to(dtype)
        counts[pw.codec] = counts.get(pw.codec, 0) + 1
    return counts


def rename_for(ck: Checkpoint):
    if ck.family.name == "V4":
        from v4convert.runtime.deepseek_v4 import model_name
        return model_name
    return lambda n: n


def logits_dense_and_packed(path) -> tuple[torch.Tensor, torch.Tensor, dict[Codec, int]]:
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 123, 8, 250, 3, 64]])
    model = load(path, dtype=torch.float32, max_seq_len=32)
    with torch.no_grad():
        ref = model(ids, 0)
        step = model(ids[:, :1], ids.shape[1])                  # one decode step after the prefill
    with Checkpoint.open(path) as ck:                          # same model, now packed; the cache is rewritten
        counts = pack_linears(model, ck, rename_for(ck))
    with torch.no_grad():
        got = model(ids, 0)
        got_step = model(ids[:, :1], ids.shape[1])
    return torch.cat([ref, step], 1), torch.cat([got, got_step], 1), counts


def assert_rel(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= tol, f"relative max error {rel:.3g} > {tol}"


@pytest.fixture(scope="module")
def nvfp4_artifact(tiny_ckpts, tmp_path_factory):
    from click.testing import CliRunner

    from v4convert.cli import main
    out = tmp_path_factory.mktemp("nvfp4") / "v3-nvfp4"
    res = CliRunner().invoke(main, ["quantize", str(tiny_ckpts["v3-tiny"]), "--fp4", "--scheme", "nvfp4",
                                    "--workers", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_runtime_packed_v4_mxfp4_experts_fp8_attention(tiny_ckpts):
    ref, got, counts = logits_dense_and_packed(tiny_ckpts["v4-flash-tiny"])
    assert counts.get(Codec.MXFP4, 0) > 0 and counts.get(Codec.FP8_BLOCK, 0) > 0, counts
    assert_rel(got, ref)


def test_runtime_packed_v3_nvfp4_artifact(nvfp4_artifact):
    ref, got, counts = logits_dense_and_packed(nvfp4_artifact)
    assert counts.get(Codec.NVFP4, 0) > 0, counts
    assert_rel(got, ref)


def test_from_checkpoint_decodes_like_the_reader(tiny_ckpts, nvfp4_artifact):
    """Packed values == ``Checkpoint.dequantize`` exactly for FP8 (F32 and E8M0 scales) and MXFP4; NVFP4 in
    compressed-tensors form within two float32 roundings (the divisor becomes a multiplier, see packed.py)."""
    for key, exact in (("v3-tiny", True), ("v4-flash-tiny", True), (None, False)):
        path = tiny_ckpts[key] if key else nvfp4_artifact
        with Checkpoint.open(path) as ck:
            names = [n for n in ck.names() if ck.tensor_info(n).storage.is_quantized]
            assert names
            for n in names[:: max(1, len(names) // 12)]:
                pw, want = from_checkpoint(ck, n), ck.dequantize(n)
                assert isinstance(pw, PackedWeight) and pw.shape == tuple(want.shape)
                if exact:
                    assert torch.equal(pw.dequantize(), want), n
                else:
                    # reader: code * fl(bs / g) -> 2 roundings; packed: fl(code * bs) * fl(1 / g) -> 2 roundings
                    # (code * bs is exact: E2M1 x E4M3 fits in 24 bits). So <= 2 ulp apart: 2^-22 relative.
                    assert bool(((pw.dequantize() - want).abs() <= 2.0 ** -22 * want.abs()).all()), n
