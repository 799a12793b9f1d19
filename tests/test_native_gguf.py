"""Native C FP8-block -> GGUF kernel: bit-exact against ``gguf_quants.quantize`` of the torch
dequantization (and gguf-py itself on a small case), odd shapes, both scale formats, edge values,
non-finite refusals, and the exporter writing the same GGUF files with either kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, quants as gguf_py_quants
from hypothesis import given, settings, strategies as st

from v4convert.checkpoint import _decode_fp8_block
from v4convert.formats import fp8, gguf_quants
from v4convert.formats.fp4 import BlockShapeError, CodecInputError
from v4convert.kernels import native
from v4convert.kernels.native import gguf as ngguf
from v4convert.kernels.native.gguf import NonFiniteValuesError, fp8_block_to_gguf_native

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.MXFP4]
SHAPES = [(200, 576), (130, 96), (3, 32), (257, 1000), (1, 160)]   # partial 128-blocks; K % 32 == 0 except 1000


def scales(bn: int, bk: int, fmt: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale as stored, its float32 values): F32 over 2**-150..2**20 with negative and subnormal entries,
    or E8M0 bytes over 0 (2**-127, subnormal) .. 2**12."""
    if fmt == "f32":
        s = torch.ldexp(1 + torch.rand(bn, bk, generator=g), torch.randint(-150, 21, (bn, bk), generator=g).float())
        s[torch.rand(bn, bk, generator=g) < 0.2] *= -1              # the torch path accepts negative scales
        return s, s
    b = torch.randint(0, 140, (bn, bk), generator=g, dtype=torch.int32).to(torch.uint8)
    b.view(-1)[0] = 0
    return b.view(torch.float8_e8m0fnu), fp8.e8m0_to_float32(b)


def fp8_bytes(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random non-NaN E4M3 bytes with a random magnitude cap per 32-block (block maxima span every
    exponent), an all-zero block, -0, +-448 and subnormal bytes."""
    raw = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x7E
    kk = -(-k // 32) * 32
    pad = torch.zeros(n, kk, dtype=torch.uint8)
    pad[:, :k] = raw
    cap = torch.randint(0, 0x7F, (n, kk // 32, 1), generator=g, dtype=torch.int32).to(torch.uint8)
    mag = torch.minimum(pad.view(n, -1, 32) & 0x7F, cap)
    raw = ((pad.view(n, -1, 32) & 0x80) | mag).view(n, kk)[:, :k].contiguous()
    raw[:, : min(k, 32)] = 0
    raw[0, -1] = 0x80                  # -0
    raw[-1, -1] = 0x7E                 # 448
    raw[-1, 0] = 0x81                  # smallest negative subnormal
    return raw


def reference(raw: torch.Tensor, s32: torch.Tensor, q: Q) -> torch.Tensor:
    x = _decode_fp8_block(raw, s32, tuple(raw.shape))
    return gguf_quants.quantize(x, q).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("fmt", ["f32", "e8m0"])
@pytest.mark.parametrize("shape,q", [(s, q) for s in SHAPES for q in QTYPES
                                     if s[1] % 32 == 0 or q not in (Q.Q8_0, Q.MXFP4)])   # block types: K % 32
def test_bit_exact_random(shape: tuple[int, int], fmt: str, q: Q) -> None:
    n, k = shape
    g = torch.Generator().manual_seed(n * 7 + k)
    raw = fp8_bytes(n, k, g)
    sc, s32 = scales(-(-n // 128), -(-k // 128), fmt, g)
    ref = reference(raw, s32, q)
    for threads in (1, 3):
        got = fp8_block_to_gguf_native(raw.view(torch.float8_e4m3fn), sc, q, threads=threads)
        assert got.dtype == torch.uint8 and got.shape == ref.shape
        assert torch.equal(got, ref), f"{q.name} threads={threads}: {(got != ref).sum()} bytes differ"


@pytest.mark.parametrize("q", QTYPES)
def test_every_byte_times_many_scales(q: Q) -> None:
    """All 256 bytes (NaN bytes replaced by +-448) under 96 F32 scales from 2**-150 (products underflow)
    to ~2**14 (F16 overflow near 65504, its 65520 rounding bound), including F16/BF16 ties."""
    cols = 96
    raw = (torch.arange(128)[:, None] * 128 + torch.arange(128 * cols)[None]).remainder(256).to(torch.uint8)
    raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw)      # every 128x128 block holds all 256 bytes
    exps = torch.linspace(-150, 14, cols).round()
    s = torch.ldexp(torch.ones(1, cols), exps.view(1, -1))
    s[0, 1::7] *= 1.0 + 2.0 ** -10 + 2.0 ** -11     # mantissas that land on F16 / BF16 halfway points
    s[0, -6:] = torch.tensor([65504 / 448, 65520 / 448, 65519.99 / 448, 146.25, 146.3, -65520 / 448])
    ref = reference(raw, s, q)
    assert torch.equal(fp8_block_to_gguf_native(raw, s, q, threads=2), ref)


def test_edge_blocks_e8m0() -> None:
    """Zero blocks, -0 blocks, all-448 blocks, subnormal bytes under the subnormal scale 2**-127 (MXFP4
    exponents 0 and 1, the argmin rule) and E8M0 2**119 (448 x 2**119 is the largest finite product)."""
    n, k = 130, 288
    raw = torch.zeros(n, k, dtype=torch.uint8)
    raw[1] = 0x80
    raw[2] = 0x7E
    raw[3] = 0xFE
    raw[4] = torch.arange(k).remainder(8).to(torch.uint8)        # subnormals 0..7 x 2**-9
    raw[5] = 0x48 | (torch.arange(k).remainder(2).to(torch.uint8) << 7)   # +-4 -> 2**-125 under 2**-127
    raw[6] = 0x50
    raw[129] = 0x7E
    sc = torch.tensor([[0, 0, 0], [246, 200, 1]], dtype=torch.uint8)
    for q in QTYPES:
        ref = reference(raw, fp8.e8m0_to_float32(sc), q)
        got = fp8_block_to_gguf_native(raw, sc, q, threads=3)
        assert torch.equal(got, ref), q.name
    mx = fp8_block_to_gguf_native(raw, sc, Q.MXFP4).view(n, -1, 17)
    assert {int(e) for e in mx[:128, :, 0].unique()} >= {0, 1}     # the e < 2 path did run


def test_q8_0_ties() -> None:
    """Blocks whose x / d lands exactly on .5 (found by search over max byte m and byte b <= m) round
    away from zero: 63.5 -> 64, -63.5 -> -64. (Ties at an even floor, where round-half-even would differ,
    need 254 x = (2k+1) amax, i.e. a factor 127 in x / amax, which ratios of E4M3 values never have.)"""
    e = fp8.e4m3_to_float32(torch.arange(127, dtype=torch.uint8))
    ties = []
    for m in range(1, 127):
        d = e[m] / 127
        v = e[: m + 1] * torch.where(d != 0, 1 / d, 0)
        ties += [(m, int(b)) for b in torch.nonzero(v - v.floor() == 0.5).flatten()]
    assert len(ties) >= 8
    raw = torch.zeros(len(ties), 32, dtype=torch.uint8)
    for i, (m, b) in enumerate(ties):
        raw[i, 0], raw[i, 1], raw[i, 2] = m, b, b | 0x80
    e8 = torch.tensor([[120]], dtype=torch.uint8)
    for sc, s32 in ((torch.ones(1, 1), torch.ones(1, 1)), (e8, fp8.e8m0_to_float32(e8))):
        got = fp8_block_to_gguf_native(raw, sc, Q.Q8_0)
        assert torch.equal(got, reference(raw, s32, Q.Q8_0))
        q = got[:, 2:].view(torch.int8)
        assert bool((q[:, 1] == 64).all()) and bool((q[:, 2] == -64).all())


def test_matches_gguf_py_directly() -> None:
    """Independent of gguf_quants: gguf-py's numpy quantizers on the dequantized values."""
    g = torch.Generator().manual_seed(5)
    raw = fp8_bytes(33, 160, g)
    sc, s32 = scales(1, 2, "f32", g)
    x = _decode_fp8_block(raw, s32, (33, 160)).numpy()
    for q in (Q.F16, Q.BF16, Q.Q8_0, Q.MXFP4):
        want = np.asarray(gguf_py_quants.quantize(x, q)).view(np.uint8).reshape(33, -1)
        got = fp8_block_to_gguf_native(raw, sc, q).numpy()
        assert np.array_equal(got, want), q.name


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), kb=st.integers(1, 12), extra=st.integers(0, 31), fmt=st.sampled_from(["f32", "e8m0"]),
       q=st.sampled_from(QTYPES), seed=st.integers(0, 2**31 - 1), threads=st.integers(1, 4))
def test_property_bit_exact(n: int, kb: int, extra: int, fmt: str, q: Q, seed: int, threads: int) -> None:
    k = kb * 32 + (0 if q in (Q.Q8_0, Q.MXFP4) else extra)
    g = torch.Generator().manual_seed(seed)
    raw = fp8_bytes(n, k, g)
    sc, s32 = scales(-(-n // 128), -(-k // 128), fmt, g)
    assert torch.equal(fp8_block_to_gguf_native(raw, sc, q, threads=threads), reference(raw, s32, q))


@pytest.mark.parametrize("fmt", ["f32", "e8m0"])
@pytest.mark.parametrize("shape", [(200, 576), (130, 96), (3, 32), (257, 992), (1, 160), (129, 4128)])
def test_fused_mxfp4_same_bytes_as_two_pass(shape: tuple[int, int], fmt: str) -> None:
    """The one-pass MXFP4 kernel (exponent table + byte thresholds) against the kept two-pass one (block maxima,
    numpy exponents, per-element encode), on partial 128-blocks, both scale formats (negative, subnormal F32 and
    E8M0 0 scales: the e < 2 argmin rule), every thread count, and written into a reused larger buffer."""
    n, k = shape
    g = torch.Generator().manual_seed(n * 7 + k)
    raw = fp8_bytes(n, k, g)
    sc, _ = scales(-(-n // 128), -(-k // 128), fmt, g)
    ref = ngguf.fp8_block_to_mxfp4_two_pass(raw, sc, threads=1)
    buf = torch.full((ref.numel() + 77,), 0xAB, dtype=torch.uint8)
    for threads in (1, 2, 3):
        assert torch.equal(fp8_block_to_gguf_native(raw, sc, Q.MXFP4, threads=threads), ref)
        got = fp8_block_to_gguf_native(raw, sc, Q.MXFP4, threads=threads, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref)
    assert bool((buf[ref.numel():] == 0xAB).all())          # nothing written past the output
    with pytest.raises(CodecInputError, match="output buffer"):
        fp8_block_to_gguf_native(raw, sc, Q.MXFP4, out=buf[: ref.numel() - 1])


def torch_nonfinite(raw: torch.Tensor, s32: torch.Tensor) -> int:
    return int((~torch.isfinite(_decode_fp8_block(raw, s32, tuple(raw.shape)))).sum())


@pytest.mark.parametrize("q", QTYPES)
def test_nonfinite_counted_exactly(q: Q) -> None:
    g = torch.Generator().manual_seed(9)
    n, k = 140, 320
    cases = []
    raw = fp8_bytes(n, k, g)
    raw[3, 5], raw[139, 300], raw[7, 0] = 0x7F, 0xFF, 0x7F                 # NaN bytes
    cases.append((raw, torch.ones(2, 3), torch.ones(2, 3)))
    sc = torch.full((2, 3), 127, dtype=torch.uint8)
    sc[1, 2] = 0xFF                                                        # E8M0 NaN scale: 12 x 64 values
    cases.append((fp8_bytes(n, k, g), sc, fp8.e8m0_to_float32(sc)))
    s = torch.ones(2, 3)
    s[0, 1], s[1, 0] = float("inf"), 1e37                                  # Inf scale, overflowing products
    cases.append((fp8_bytes(n, k, g), s, s))
    for raw, sc, s32 in cases:
        want = torch_nonfinite(raw, s32)
        assert want > 0
        with pytest.raises(NonFiniteValuesError, match="w0") as ei:
            fp8_block_to_gguf_native(raw, sc, q, threads=3, name="w0")
        assert ei.value.count == want


def test_bad_inputs_are_user_errors() -> None:
    raw = torch.zeros(3, 48, dtype=torch.uint8)
    with pytest.raises(BlockShapeError, match="K % 32"):
        fp8_block_to_gguf_native(raw, torch.ones(1, 1), Q.Q8_0, name="w1")
    with pytest.raises(BlockShapeError, match="scale shape"):
        fp8_block_to_gguf_native(raw, torch.ones(1, 2), Q.F16, name="w2")
    with pytest.raises(CodecInputError, match="Q4_0"):
        fp8_block_to_gguf_native(raw, torch.ones(1, 1), Q.Q4_0, name="w3")
    with pytest.raises(CodecInputError, match="2-D"):
        fp8_block_to_gguf_native(raw.float(), torch.ones(1, 1), Q.F16, name="w4")
    bf = torch.full((1, 1), 3.0, dtype=torch.bfloat16)      # BF16 stored scales: widened exactly, like the torch path
    assert torch.equal(fp8_block_to_gguf_native(raw + 0x38, bf, Q.F32).view(torch.float32), torch.full((3, 48), 3.0))


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path) -> None:
    ngguf._library.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("PATH", str(tmp_path))
        ok, why = ngguf.gguf_native_status()
        assert not ok and "no C compiler" in why
        with pytest.raises(native.NativeUnavailableError, match="no C compiler"):
            fp8_block_to_gguf_native(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(1, 1), Q.F16)
    finally:
        ngguf._library.cache_clear()


@pytest.mark.parametrize("shape", [(3, 5, 48), (1, 16), (129, 272), (2, 0, 16)])
def test_repack_matches_torch(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    p = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    s = torch.randint(0, 255, (*shape[:-1], shape[-1] * 2 // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    want = gguf_quants.repack_mxfp4(p, s)
    buf = torch.full((want.numel() + 5,), 0xAB, dtype=torch.uint8)
    for threads in (1, 3):
        got = ngguf.repack_mxfp4_native(p.view(torch.int8), s.view(torch.float8_e8m0fnu), threads=threads)
        assert torch.equal(got, want)
        got = ngguf.repack_mxfp4_native(p, s, threads=threads, out=buf)          # into a reused buffer
        assert torch.equal(got, want) and bool((buf[want.numel():] == 0xAB).all())
    if s.numel():                                                             # NaN scales: counted in the pass
        s.view(-1)[:: 3] = 0xFF
        with pytest.raises(ngguf.NaNScalesError, match="255") as ei:
            ngguf.repack_mxfp4_native(p, s, threads=3)
        assert ei.value.count == int((s == 0xFF).sum())


def test_repack_errors_match_torch() -> None:
    p = torch.zeros(4, 16, dtype=torch.uint8)
    for s in (torch.zeros(4, 2, dtype=torch.uint8), torch.full((4, 1), 255, dtype=torch.uint8)):
        with pytest.raises(gguf_quants.QuantError) as want:
            gguf_quants.repack_mxfp4(p, s, "w9")
        with pytest.raises(gguf_quants.QuantError) as got:
            ngguf.repack_mxfp4_native(p, s, "w9")
        assert str(got.value) == str(want.value)


# ------------------------------------------------------------------------------------------ exporter
def _export_both(ckpt, tmp_path, monkeypatch, mix, **kw) -> dict[str, object]:
    """Export ``ckpt`` with $V4CONVERT_GGUF_KERNEL native then torch; -> {kernel: (file bytes or the error,
    native calls: 1 per FP8 encode, 2 per MXFP4 re-pack)}."""
    from v4convert.export.gguf.exporter import KERNEL_ENV, export_gguf
    out = {}
    real, real_repack = ngguf.fp8_block_to_gguf_native, ngguf.repack_mxfp4_native
    for kern in ("native", "torch"):
        calls = []
        monkeypatch.setattr(ngguf, "fp8_block_to_gguf_native", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(ngguf, "repack_mxfp4_native", lambda *a, **k: calls.append(2) or real_repack(*a, **k))
        monkeypatch.setenv(KERNEL_ENV, kern)
        (tmp_path / kern).mkdir()
        try:
            res = export_gguf(ckpt, tmp_path / kern / "m.gguf", mix, modelfile=False, **kw)
            out[kern] = ([p.read_bytes() for p in res.paths], calls)
        except Exception as e:  # noqa: BLE001 -- compared below: same type and message with either kernel
            out[kern] = (e, calls)
    return out


@pytest.mark.parametrize("src", ["tiny-v3", "v4-flash-tiny"])   # FP8 with F32 scales / with E8M0 scales
@pytest.mark.parametrize("main,expert", [("Q8_0", "MXFP4"), ("F16", "Q8_0"), ("BF16", "BF16"), ("F32", "F16")])
def test_export_same_file_with_either_kernel(src: str, main: str, expert: str, tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from v4convert.export.gguf.types import GGUFType, TypeMix
    from v4convert.synth import synth
    ckpt = Path(__file__).parents[1] / "v4convert/data/tiny-v3" if src == "tiny-v3" else synth(src, tmp_path / src).out
    got = _export_both(ckpt, tmp_path, monkeypatch, TypeMix(GGUFType(main), GGUFType(expert)))
    (nat, c_native), (tor, c_torch) = got["native"], got["torch"]
    assert 1 in c_native and not c_torch          # the native kernel did run, and only when asked for
    assert (2 in c_native) == (src != "tiny-v3" and expert == "MXFP4")     # V4's MXFP4 experts re-packed in C
    assert len(nat) == len(tor) and all(a == b for a, b in zip(nat, tor))


def _with_nan(tmp_path, name: str):
    """A copy of tiny-v3 with one NaN E4M3 byte (0x7F) in the FP8 tensor ``name``."""
    import shutil
    from pathlib import Path

    from v4convert.checkpoint import Checkpoint
    src = Path(__file__).parents[1] / "v4convert/data/tiny-v3"
    dst = tmp_path / "nan-v3"
    shutil.copytree(src, dst)
    with Checkpoint.open(dst) as ck:
        e = ck.tensor_info(name).parts["weight"]
    with open(e.path, "r+b") as f:
        f.seek(e.start + 1000)
        f.write(b"\x7f")
    return dst


@pytest.mark.parametrize("tensor", ["q_a_proj", "kv_b_proj"])     # _encode / _float (k_b, v_b)
def test_export_nonfinite_same_with_either_kernel(tensor: str, tmp_path, monkeypatch) -> None:
    from v4convert.export.gguf.types import ExportError, GGUFType, TypeMix
    ckpt = _with_nan(tmp_path, f"model.layers.0.self_attn.{tensor}.weight")
    (tmp_path / "refuse").mkdir()
    got = _export_both(ckpt, tmp_path / "refuse", monkeypatch, TypeMix(GGUFType.Q8_0, GGUFType.MXFP4))
    (en, _), (et, _) = got["native"], got["torch"]
    assert isinstance(en, ExportError) and type(en) is type(et) and str(en) == str(et)
    assert "1 NaN/Inf values" in str(en) and tensor in str(en)
    # --allow-nonfinite: F16 keeps the NaN (the torch path writes it), Q8_0 refuses as gguf_quants does
    (tmp_path / "keep").mkdir()
    got = _export_both(ckpt, tmp_path / "keep", monkeypatch, TypeMix(GGUFType.F16, GGUFType.F16), allow_nonfinite=True)
    assert got["native"][0] == got["torch"][0] and isinstance(got["native"][0], list)
    (tmp_path / "q8").mkdir()
    got = _export_both(ckpt, tmp_path / "q8", monkeypatch, TypeMix(GGUFType.Q8_0, GGUFType.F16), allow_nonfinite=True)
    (en, _), (et, _) = got["native"], got["torch"]
    assert isinstance(en, gguf_quants.QuantError) and str(en) == str(et)


def test_export_kernel_choice(monkeypatch) -> None:
    from v4convert.export.gguf import encode
    from v4convert.export.gguf.types import ExportError
    assert encode._gguf_kernel("")[0] is native.Kernel.NATIVE          # default where it builds
    assert encode._gguf_kernel("torch")[0] is native.Kernel.TORCH
    with pytest.raises(ExportError, match="expected 'native' or 'torch'"):
        encode._gguf_kernel("fast")
    ngguf._library.cache_clear()
    monkeypatch.setattr(encode, "_KERNELS", {})
    try:
        monkeypatch.setenv("PATH", "/nonexistent")
        monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache")
        assert encode._gguf_kernel("")[0] is native.Kernel.TORCH         # logged fallback
        with pytest.raises(ExportError, match="no C compiler"):
            encode._gguf_kernel("native")
    finally:
        ngguf._library.cache_clear()
