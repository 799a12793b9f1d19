"""Native C FP8-block -> NVFP4 RTN kernel: bit-exact against the torch codec (atol=0) on odd shapes."""
from __future__ import annotations

import pytest
import torch

from v4convert.kernels import native
from v4convert.formats.fp4 import BlockShapeError, CodecInputError, NonFiniteInputError
from v4convert.formats.fp8_block import (
    FP8BlockTensor,
    FP8ScaleFormat,
    fp8_block_dequantize,
    fp8_block_quantize,
    fp8_block_to_nvfp4,
)
from v4convert.kernels.native import (
    NativeUnavailableError,
    fp8_amax_native,
    fp8_block_amax_native,
    fp8_block_to_nvfp4_native,
    fp8_encode_fused_native,
    fp8_encode_native,
    native_status,
)
from v4convert.formats.nvfp4 import Backend, NVFP4Convention, NVFP4Tensor, nvfp4_quantize

CONVS = list(NVFP4Convention)
FMTS = [FP8ScaleFormat.F32, FP8ScaleFormat.E8M0, FP8ScaleFormat.F32_POW2]
SHAPES = [(200, 576), (576, 208), (3, 96), (130, 272), (1, 16)]  # K % 16 == 0, partial 128-blocks


def random_bytes_tensor(shape: tuple[int, int], fmt: FP8ScaleFormat, seed: int) -> FP8BlockTensor:
    """Every non-NaN E4M3 byte (±0, subnormals, ±448) with 128-block scales over ~6 decades, and a random
    magnitude cap per 16-block, so many NVFP4 block scales are E4M3 subnormals or underflow to zero,
    plus an all-zero 16-block per row."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    raw = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x7E  # no NaN: +-448 instead
    cap = torch.randint(0, 0x7F, (n, k // 16, 1), generator=g, dtype=torch.int32).to(torch.uint8)
    cap[0, 0] = 0x7E
    mag = torch.minimum(raw.view(n, k // 16, 16) & 0x7F, cap)  # per-16-block magnitude cap: amax spans E4M3
    raw = ((raw.view(n, k // 16, 16) & 0x80) | mag).view(n, k)
    raw[:, :16] = 0
    raw[0, 16 % k: 16 % k + 1] = 0x80  # -0
    bn, bk = -(-n // 128), -(-k // 128)
    if fmt is FP8ScaleFormat.E8M0:
        scale = torch.randint(127 - 20, 127 + 5, (bn, bk), generator=g, dtype=torch.int32).to(torch.uint8)
        scale.view(-1)[-1] = 0 if scale.numel() > 1 else 127 - 40  # 2**-127 (float32 subnormal)
        scale = scale.view(torch.float8_e8m0fnu)
    elif fmt is FP8ScaleFormat.F32_POW2:
        scale = torch.ldexp(torch.ones(bn, bk), torch.randint(-20, 5, (bn, bk), generator=g).float())
    else:
        scale = (10.0 ** (torch.rand(bn, bk, generator=g) * 6 - 6)).float()
    return FP8BlockTensor(weight=raw.view(torch.float8_e4m3fn), scale=scale, fmt=fmt)


def assert_same(a: NVFP4Tensor, b: NVFP4Tensor) -> None:
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
    assert torch.equal(a.global_scale.view(torch.int32), b.global_scale.view(torch.int32))
    assert torch.equal(a.amax.view(torch.int32), b.amax.view(torch.int32))


def test_compiles_into_cache() -> None:
    ok, why = native_status()
    assert ok, why
    libs = list(native.cache_dir().glob("*/libv4c_fp8_nvfp4.so"))
    assert libs, f"no library under {native.cache_dir()}"


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_bytes_match_torch(shape, fmt, conv) -> None:
    t = random_bytes_tensor(shape, fmt, seed=shape[0] * 7 + shape[1])
    got = fp8_block_to_nvfp4_native(t, convention=conv, threads=2)
    ref = nvfp4_quantize(fp8_block_dequantize(t), convention=conv)  # naive composition
    assert_same(got, ref)
    assert_same(got, fp8_block_to_nvfp4(t, convention=conv, backend=Backend.EAGER))
    ws = got.block_scale.view(torch.uint8)
    if shape[0] * shape[1] >= 4096:  # the sample really exercises subnormal and zero block scales
        assert bool(((ws > 0) & (ws < 8)).any()) and bool((ws == 0).any())


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("fmt", [FP8ScaleFormat.F32, FP8ScaleFormat.E8M0])
def test_quantized_floats_match_torch(fmt, conv) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(576, 208, generator=g) * torch.exp(2 * torch.randn(576, 1, generator=g))
    x[5:140, :] = 0.0  # zero blocks
    x[300, 17] = -0.0
    t = fp8_block_quantize(x, fmt=fmt)
    ref = nvfp4_quantize(fp8_block_dequantize(t), convention=conv)
    assert_same(fp8_block_to_nvfp4_native(t, convention=conv), ref)
    big = float(ref.amax) * 3.5  # supplied (shared) global amax
    assert_same(fp8_block_to_nvfp4_native(t, convention=conv, global_amax=big),
                nvfp4_quantize(fp8_block_dequantize(t), convention=conv, global_amax=big))


@pytest.mark.parametrize("conv", CONVS)
def test_all_zero_and_extremes(conv) -> None:
    raw = torch.zeros(3, 96, dtype=torch.uint8)
    raw[1, ::2] = 0x80  # -0
    t = FP8BlockTensor(raw.view(torch.float8_e4m3fn), torch.full((1, 1), 0.5), FP8ScaleFormat.F32)
    assert_same(fp8_block_to_nvfp4_native(t, convention=conv), nvfp4_quantize(fp8_block_dequantize(t), convention=conv))
    raw[0, :] = 0x7E  # +448
    raw[2, :] = 0xFE  # -448
    raw[1, 1::2] = 0x01  # smallest subnormal
    t = FP8BlockTensor(raw.view(torch.float8_e4m3fn), torch.full((1, 1), 3.0e-3), FP8ScaleFormat.F32)
    assert_same(fp8_block_to_nvfp4_native(t, convention=conv), nvfp4_quantize(fp8_block_dequantize(t), convention=conv))


@pytest.mark.parametrize("conv", CONVS)
def test_tiny_amax_refused_like_torch(conv) -> None:
    raw = torch.full((3, 96), 0x38, dtype=torch.uint8)  # 1.0
    raw[:, :16] = 0  # a zero block: 0 * inf (CT) or 0 / 0 (ModelOpt) is NaN in the torch codec
    tiny = torch.tensor([[2.0 ** -149]])  # amax 2**-149: global scale inf (CT) or 0 (ModelOpt)
    t = FP8BlockTensor(raw.view(torch.float8_e4m3fn), tiny, FP8ScaleFormat.F32)
    with pytest.raises(NonFiniteInputError):
        nvfp4_quantize(fp8_block_dequantize(t), convention=conv)
    with pytest.raises(NonFiniteInputError, match="w0: NVFP4 global scale"):
        fp8_block_to_nvfp4_native(t, convention=conv, name="w0")


def test_thread_count_does_not_change_bytes() -> None:
    t = random_bytes_tensor((300, 400), FP8ScaleFormat.F32, seed=9)
    one = fp8_block_to_nvfp4_native(t, threads=1)
    for n in (2, 7, 64):
        assert_same(fp8_block_to_nvfp4_native(t, threads=n), one)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("fmt", [FP8ScaleFormat.F32, FP8ScaleFormat.E8M0])
@pytest.mark.parametrize("shape", SHAPES + [(257, 400), (129, 16), (130, 2064)])
@pytest.mark.parametrize("avx2", [True, False])
def test_fused_matches_two_stage(shape, fmt, conv, avx2, monkeypatch) -> None:
    """The fused hot path (amax from 128-block max bytes; 16-block amax recomputed in the encode pass, into caller
    buffers; AVX2 two-block steps or the SSE one-block loop: ``V4C_NO_AVX2``) gives the two-stage kernel's bytes,
    for any thread count."""
    if not avx2:
        monkeypatch.setenv("V4C_NO_AVX2", "1")
    t = random_bytes_tensor(shape, fmt, seed=shape[0] * 11 + shape[1])
    ba, amax = fp8_block_amax_native(t.weight, t.scale, threads=1)
    from v4convert.formats.nvfp4 import nvfp4_global_scale
    g = nvfp4_global_scale(amax * 1.75, conv)           # a shared (larger) global amax, as fused partners get
    ref_p, ref_ws = fp8_encode_native(t.weight, t.scale, ba, g, conv, threads=1)
    n, k = shape
    for threads in (1, 2, 5):
        a = fp8_amax_native(t.weight, t.scale, threads=threads)
        assert torch.equal(a.view(torch.int32), amax.view(torch.int32))
        buf = torch.full((n * k // 2 + n * k // 16 + 3,), 0xAB, dtype=torch.uint8)   # odd offsets: no alignment
        p, ws = fp8_encode_fused_native(t.weight, t.scale, g, conv, threads=threads,
                                        packed_out=buf[1: 1 + n * k // 2], ws_out=buf[2 + n * k // 2: -1])
        assert torch.equal(p, ref_p) and torch.equal(ws.view(torch.uint8), ref_ws.view(torch.uint8))
        assert buf[0] == 0xAB and buf[1 + n * k // 2] == 0xAB and buf[-1] == 0xAB      # nothing outside
        p2, _ = fp8_encode_fused_native(t.weight, t.scale, g, conv, threads=threads)
        assert torch.equal(p2, ref_p)


def test_fused_amax_bad_input_errors() -> None:
    t = random_bytes_tensor((130, 272), FP8ScaleFormat.F32, seed=1)
    for r, c in ((129, 271), (0, 0), (64, 130)):
        raw = t.weight.view(torch.uint8).clone()
        raw[r, c] = 0xFF  # NaN
        raw[r, (c + 16) % 272] = 0x7F
        for threads in (1, 3):
            with pytest.raises(NonFiniteInputError, match="w1: 2 NaN E4M3"):
                fp8_amax_native(raw, t.scale, name="w1", threads=threads)
    s = t.scale.clone()
    s[1, 2] = -0.0
    with pytest.raises(NonFiniteInputError, match="w2: non-finite or negative"):
        fp8_amax_native(t.weight, s, name="w2")
    e = torch.full((2, 3), 254, dtype=torch.uint8)     # 2**127: e4m3 * scale overflows float32
    with pytest.raises(NonFiniteInputError, match="w3: non-finite block amax"):
        fp8_amax_native(t.weight, e, name="w3")
    with pytest.raises(ValueError, match="w4 packed"):
        fp8_encode_fused_native(t.weight, t.scale, torch.tensor(1.0), NVFP4Convention.MODELOPT, name="w4",
                                packed_out=torch.empty(7, dtype=torch.uint8))


def test_bad_input_errors() -> None:
    t = random_bytes_tensor((130, 272), FP8ScaleFormat.F32, seed=1)
    raw = t.weight.view(torch.uint8).clone()
    raw[129, 271] = 0xFF  # NaN
    with pytest.raises(NonFiniteInputError, match="w1: 1 NaN E4M3"):
        fp8_block_amax_native(raw, t.scale, name="w1")
    s = t.scale.clone()
    s[1, 2] = float("inf")
    with pytest.raises(NonFiniteInputError, match="w2: non-finite or negative FP8 block scale"):
        fp8_block_amax_native(t.weight, s, name="w2")
    s[1, 2] = -0.0  # the magnitude-byte block amax needs scales >= +0
    with pytest.raises(NonFiniteInputError, match="w2: non-finite or negative"):
        fp8_block_amax_native(t.weight, s, name="w2")
    e = torch.full((2, 3), 127, dtype=torch.uint8)
    e[1, 1] = 0xFF
    with pytest.raises(NonFiniteInputError, match="w3"):
        fp8_block_amax_native(t.weight, e, name="w3")
    with pytest.raises(BlockShapeError, match="w4"):
        fp8_block_amax_native(torch.zeros(576, 200, dtype=torch.uint8), torch.ones(5, 2), name="w4")
    with pytest.raises(BlockShapeError, match="w5"):
        fp8_block_amax_native(t.weight, torch.ones(1, 3), name="w5")
    with pytest.raises(CodecInputError, match="w6"):
        fp8_block_to_nvfp4_native(t, global_amax=0.0, name="w6")


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path) -> None:
    native._library.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("PATH", str(tmp_path))
        ok, why = native_status()
        assert not ok and "no C compiler" in why
        t = random_bytes_tensor((3, 96), FP8ScaleFormat.F32, seed=2)
        with pytest.raises(NativeUnavailableError, match="no C compiler"):
            fp8_block_to_nvfp4_native(t)
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("preset_name,recipe,container", [
    ("v3-tiny", "nvfp4-experts", "compressed-tensors"),           # F32 block scales
    ("v4-flash-tiny", "nvfp4-all-linear", "modelopt"),           # E8M0 block scales (attention)
])
def test_engine_kernels_byte_identical(tiny_ckpts, tmp_path, monkeypatch, preset_name, recipe, container) -> None:
    """The quantize engine writes the same bytes with ``Kernel.NATIVE`` and ``Kernel.TORCH``."""
    from v4convert.quant import engine, workers
    from v4convert.formats.containers import Container

    from .test_quantize import run_quantize
    outs = {}
    for kern in native.Kernel:
        used: list[str] = []

        def run_unit(*a, **kw):
            r = workers.run_unit(*a, **kw)
            used.append(r.kernel)
            return r
        monkeypatch.setattr(engine, "run_unit", run_unit)      # observe which kernel each unit used
        run_quantize(tiny_ckpts[preset_name], tmp_path / kern.value, recipe=recipe, container=Container(container),
                     kernel=kern)
        assert kern.value in used and set(used) <= {kern.value, ""}
        outs[kern] = tmp_path / kern.value
    files = sorted(p.name for p in outs[native.Kernel.NATIVE].iterdir())
    assert files == sorted(p.name for p in outs[native.Kernel.TORCH].iterdir())
    for f in files:
        a, b = outs[native.Kernel.NATIVE] / f, outs[native.Kernel.TORCH] / f
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), f


def test_choose_kernel_is_explicit() -> None:
    from v4convert.quant.plan import QuantizeError
    from v4convert.quant.workers import choose_kernel
    assert choose_kernel(native.Kernel.TORCH)[0] is native.Kernel.TORCH
    assert choose_kernel(None)[0] is native.Kernel.NATIVE  # default when it compiles
    assert choose_kernel(native.Kernel.NATIVE)[0] is native.Kernel.NATIVE
    assert choose_kernel(None, "cuda")[0] is native.Kernel.TORCH
    with pytest.raises(QuantizeError, match="runs on the CPU"):
        choose_kernel(native.Kernel.NATIVE, "cuda")
