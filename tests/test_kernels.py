"""Triton kernels under the CPU interpreter (``TRITON_INTERPRET=1``) against their PyTorch references.

With ``V4CONVERT_KERNEL_DEVICE=cuda`` the same tests run the kernels compiled on the GPU (``bench/gpu_check.sh``);
references always run on the CPU.

Decoding is compared bit for bit (``atol=0``) over all 16 E2M1 codes and all 256 scale bytes, against
ml_dtypes as an independent decoder. GEMMs are compared with a bound on float32 accumulation error
(:func:`accum_bound`), never a guessed tolerance. Shapes are small and odd (the interpreter is slow).
"""
from __future__ import annotations

import importlib
import os
import sys

DEVICE = os.environ.get("V4CONVERT_KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"     # before anything builds a Triton kernel in this process

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Modules holding @triton.jit code decide compiled-vs-interpreted when imported: if another test imported them
# first without the interpreter, import them again here (in dependency order).
_TRITON_MODULES = ("v4convert.kernels.tl_codecs", "v4convert.kernels.gemm", "v4convert.kernels.moe_triton",
                   "v4convert.kernels.quant_triton")
for _m in _TRITON_MODULES:
    if _m in sys.modules:
        importlib.reload(sys.modules[_m])

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from v4convert.formats import fp4  # noqa: E402
from v4convert.kernels import gemm, moe, moe_triton, quant, quant_triton  # noqa: E402
from v4convert.kernels.packed import (Codec, PackedWeight, PackedWeightError, packed_linear,  # noqa: E402
                                      packed_linear_reference, stack_experts)
from v4convert.families.roles import Storage  # noqa: E402
from v4convert.kernels.packed import pack_from_parts  # noqa: E402
from v4convert.kernels.quant_triton import _e2m1_rne, _e4m3_rne  # noqa: E402
from v4convert.kernels.tl_codecs import e2m1_to_f32, e4m3_to_f32, e8m0_to_f32  # noqa: E402

U32 = 2.0 ** -24          # float32 unit roundoff
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}   # half an ulp, relative


def test_kernels_are_interpreted():
    if DEVICE == "cpu":
        assert gemm.interpreting(), "Triton kernels were built compiled; the interpreter tests would not run them"
    else:
        assert not gemm.interpreting() and torch.cuda.is_available()


def on(*ts):
    """Move tensors / packed weights to the kernel device."""
    out = tuple(t.to(DEVICE) for t in ts)
    return out if len(out) > 1 else out[0]


# ---------------------------------------------------------------------------------------------- helpers
def codes_to_packed(codes: torch.Tensor) -> torch.Tensor:
    return fp4.pack_fp4(codes)


def rand_packed(codec: Codec, n: int, k: int, gen: torch.Generator, lead: tuple[int, ...] = ()) -> PackedWeight:
    """Random packed weight with finite scales spanning a realistic range."""
    if codec is Codec.FP8_BLOCK:
        data = torch.randint(0, 256, (*lead, n, k), dtype=torch.uint8, generator=gen)
        data[(data & 127) == 127] = 0x38            # no NaN bytes in GEMM inputs (decoding tests cover them)
        sc = torch.rand(*lead, -(-n // 128), -(-k // 128), generator=gen) * 1e-2 + 1e-4
        return PackedWeight(codec, data, sc, torch.ones(*lead, n), (*lead, n, k), "w")
    data = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, generator=gen)
    if codec is Codec.NVFP4:
        sb = torch.randint(1, 0x7E, (*lead, n, k // 16), dtype=torch.uint8, generator=gen)
        g = torch.rand(*lead, 1, generator=gen) * 1e-3 + 1e-4
        return PackedWeight(codec, data, sb, g.expand(*lead, n).contiguous(), (*lead, n, k), "w")
    sb = torch.randint(117, 130, (*lead, n, k // 32), dtype=torch.uint8, generator=gen)
    return PackedWeight(codec, data, sb, torch.ones(*lead, n), (*lead, n, k), "w")


def accum_bound(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Bound on |kernel - reference| for ``x @ w.T`` both accumulated in float32 in different orders.

    Each side: |err| <= gamma_K * sum|x||w| with gamma_K = K u / (1 - K u) (Higham, Thm 3.1), so their
    difference is <= 2 gamma_K sum|x||w|. NVFP4's global multiplier is applied per element by the reference
    and to the sum by the kernel: one more rounding each, + 2u sum|x||w|. A 16-bit output adds the two
    roundings to the output type: eps |y|. Computed in float64.
    """
    k = x.shape[-1]
    gamma = k * U32 / (1 - k * U32)
    s = x.double().abs() @ w.double().abs().T
    y = x.double() @ w.double().T
    return (2 * gamma + 2 * U32) * s + 2 * OUT_EPS[out_dtype] * y.abs() + 1e-30


def assert_within(y: torch.Tensor, y_ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (y.double() - y_ref.double()).abs()
    bad = err > bound
    assert not bool(bad.any()), f"{int(bad.sum())} elements beyond the bound; worst err {float(err.max())}, " \
                                f"bound there {float(bound.flatten()[err.flatten().argmax()])}"


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("codec", [Codec.NVFP4, Codec.MXFP4])
def test_dequant_fp4_all_codes_all_scale_bytes(codec):
    """256 rows (one per scale byte, NaN bytes included) x every E2M1 code; kernel == reference == ml_dtypes."""
    kb = codec.k_block
    codes = torch.arange(16, dtype=torch.uint8).repeat(256, kb // 16 * 2)          # [256, 2 blocks]
    k = codes.shape[1]
    sbytes = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, k // kb).contiguous()
    g = torch.full((256,), 0.3, dtype=torch.float32) if codec is Codec.NVFP4 else torch.ones(256)
    pw = PackedWeight(codec, codes_to_packed(codes), sbytes, g, (256, k))
    got = gemm.dequantize(on(pw)).cpu()
    ref = pw.dequantize()
    torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)
    num = ~torch.isnan(ref)                                                         # a NaN's sign is unspecified
    assert torch.equal(torch.signbit(got[num]), torch.signbit(ref[num]))            # -0.0 for code 8
    # independent decoder: ml_dtypes, products in float32 in the same order
    vals = codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    sdt = ml_dtypes.float8_e4m3fn if codec is Codec.NVFP4 else ml_dtypes.float8_e8m0fnu
    sv = np.repeat(sbytes.numpy().view(sdt).astype(np.float32), kb, axis=1)
    with np.errstate(over="ignore"):          # E8M0 254 x 6 = inf in float32, in every decoder
        indep = vals * sv
    if codec is Codec.NVFP4:
        indep = indep * np.float32(0.3)
    np.testing.assert_array_equal(ref.numpy(), indep)                               # NaN == NaN here


def test_dequant_fp8_all_bytes_partial_blocks():
    """Every E4M3 byte (NaN included) in a 200 x 136 weight (partial 128-blocks both ways), float32 scales."""
    gen = torch.Generator().manual_seed(1)
    n, k = 200, 136
    data = (torch.arange(n * k) % 256).to(torch.uint8).view(n, k)[torch.randperm(n, generator=gen)]
    sc = torch.rand(2, 2, generator=gen) * 3
    pw = PackedWeight(Codec.FP8_BLOCK, data, sc, torch.ones(n), (n, k))
    got = gemm.dequantize(on(pw)).cpu()
    ref = pw.dequantize()
    torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)
    num = ~torch.isnan(ref)
    assert torch.equal(torch.signbit(got[num]), torch.signbit(ref[num]))
    s_full = np.repeat(np.repeat(sc.numpy(), 128, 0), 128, 1)[:n, :k]
    indep = data.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32) * s_full
    np.testing.assert_array_equal(ref.numpy(), indep)


@triton.jit
def _decode_probe(b_ptr, o4_ptr, o8_ptr, oe_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    b = tl.load(b_ptr + offs).to(tl.int32)
    tl.store(o4_ptr + offs, e2m1_to_f32(b & 15))
    tl.store(o8_ptr + offs, e4m3_to_f32(b))
    tl.store(oe_ptr + offs, e8m0_to_f32(b))


def test_device_decoders_every_byte():
    b = torch.arange(256, dtype=torch.uint8)
    o4, o8, oe = (torch.empty(256) for _ in range(3))
    b, o4, o8, oe = on(b, o4, o8, oe)
    _decode_probe[(1,)](b, o4, o8, oe, N=256)
    b, o4, o8, oe = (t.cpu() for t in (b, o4, o8, oe))
    np.testing.assert_array_equal(o4.numpy(), np.array(fp4.E2M1_VALUES * 16, dtype=np.float32))
    assert torch.equal(torch.signbit(o4[:16]), torch.tensor([False] * 8 + [True] * 8))
    np.testing.assert_array_equal(o8.numpy(), b.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    np.testing.assert_array_equal(oe.numpy(), b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32))


# ---------------------------------------------------------------------------------------------- GEMM
GEMM_CASES = [  # (codec, M, N, K, x dtype, split_k)
    (Codec.NVFP4, 1, 70, 256, torch.float32, None),
    (Codec.NVFP4, 13, 33, 160, torch.bfloat16, None),
    (Codec.NVFP4, 37, 130, 96, torch.float16, 2),
    (Codec.MXFP4, 1, 70, 256, torch.float32, 3),
    (Codec.MXFP4, 16, 65, 224, torch.float32, None),
    (Codec.MXFP4, 70, 20, 64, torch.bfloat16, None),
    (Codec.MXFP4, 5, 17, 96, torch.float16, None),
    (Codec.FP8_BLOCK, 1, 200, 200, torch.float32, None),
    (Codec.FP8_BLOCK, 9, 131, 320, torch.bfloat16, 2),
    (Codec.FP8_BLOCK, 66, 40, 136, torch.float32, None),
]


@pytest.mark.parametrize("codec,m,n,k,dtype,split", GEMM_CASES, ids=lambda v: getattr(v, "value", str(v)))
def test_packed_gemm_vs_reference(codec, m, n, k, dtype, split):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    pw = rand_packed(codec, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = gemm.packed_gemm(*on(x, pw), split_k=split).cpu()
    y_ref = packed_linear_reference(x, pw)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_within(y, y_ref, accum_bound(x.float(), pw.dequantize(), dtype))


def test_packed_gemm_bad_input():
    gen = torch.Generator().manual_seed(0)
    pw = rand_packed(Codec.MXFP4, 8, 64, gen)
    with pytest.raises(PackedWeightError, match="K 32 != weight K 64"):
        gemm.packed_gemm(*on(torch.zeros(2, 32), pw))
    with pytest.raises(PackedWeightError, match="float32/bfloat16/float16"):
        gemm.packed_gemm(*on(torch.zeros(2, 64, dtype=torch.float64), pw))
    with pytest.raises(PackedWeightError, match="multiple of the mxfp4 block"):
        PackedWeight(Codec.MXFP4, torch.zeros(8, 24, dtype=torch.uint8), torch.zeros(8, 1, dtype=torch.uint8),
                     torch.ones(8), (8, 48), "blk.0.w")
    with pytest.raises(PackedWeightError, match="blk.1.w: nvfp4 scale"):
        PackedWeight(Codec.NVFP4, torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 3, dtype=torch.uint8),
                     torch.ones(8), (8, 64), "blk.1.w")


# ---------------------------------------------------------------------------------------------- MoE
def moe_bound(x, idx, wts, wg, wu, wd, limit, dtype):
    """First-order bound on |kernel - reference| for the MoE (float64, per output element).

    Stage 1 (gate/up, K = D): accum_bound's 2 gamma_D + 2u on sum|x||W|. Through the clamp (1-Lipschitz) and
    silu(g) u (|d silu/dg| <= 1.1): dh = 1.1 |u| dg + |silu(g)| du + 8u |h| (sigmoid/exp of the two paths
    differ by a few ulps) + 2 eps(dtype) |h| (h is stored in x.dtype by both). Stage 2 (down, K = I):
    w (|W| dh + (2 gamma_I + 2u) |W||h|), then the top-k sum: + k u sum|y_slot|; output rounding 2 eps |y|.
    The result is doubled to cover second-order terms.
    """
    t, kk = idx.shape
    d, inter = x.shape[1], wg.shape[1]
    ga, gi = (n * U32 / (1 - n * U32) for n in (d, inter))
    eps = OUT_EPS[dtype]
    bound = torch.zeros(t, d, dtype=torch.float64)
    ysum = torch.zeros(t, d, dtype=torch.float64)
    xs = x.double()
    dense = {e: tuple(w.expert(e).dequantize().double() for w in (wg, wu, wd)) for e in idx.unique().tolist() if e >= 0}
    for ti in range(t):
        for j in range(kk):
            e = int(idx[ti, j])
            if e < 0:
                continue
            Wg, Wu, Wd = dense[e]
            g, u = Wg @ xs[ti], Wu @ xs[ti]
            dg = (2 * ga + 2 * U32) * (Wg.abs() @ xs[ti].abs())
            du = (2 * ga + 2 * U32) * (Wu.abs() @ xs[ti].abs())
            if limit is not None:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
            sg = torch.nn.functional.silu(g)
            h = sg * u
            dh = 1.1 * u.abs() * dg + sg.abs() * du + (8 * U32 + 2 * eps) * h.abs()
            w = float(wts[ti, j])
            ys = w * (Wd @ h)
            bound[ti] += abs(w) * (Wd.abs() @ dh + (2 * gi + 2 * U32) * (Wd.abs() @ h.abs())) + kk * U32 * ys.abs()
            ysum[ti] += ys
    return 2 * (bound + 2 * eps * ysum.abs()) + 1e-30


MOE_CASES = [  # (codec, T, top_k, E, D, I, limit, dtype, blocks)
    (Codec.MXFP4, 7, 3, 6, 64, 96, 7.0, torch.float32, None),
    (Codec.NVFP4, 1, 2, 4, 48, 80, None, torch.float32, None),                 # a single token
    (Codec.FP8_BLOCK, 6, 2, 4, 136, 144, 0.5, torch.float32, (16, 128, 64)),  # partial 128-blocks, clamp bites
    (Codec.MXFP4, 5, 2, 4, 64, 32, None, torch.bfloat16, (16, 32, 64)),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")     # sigmoid of very negative gates -> 0
@pytest.mark.parametrize("codec,t,k,e,d,inter,limit,dtype,blocks", MOE_CASES,
                         ids=lambda v: getattr(v, "value", str(v)))
def test_moe_vs_reference(codec, t, k, e, d, inter, limit, dtype, blocks):
    gen = torch.Generator().manual_seed(t * 100 + e)
    wg, wu = (rand_packed(codec, inter, d, gen, (e,)) for _ in range(2))
    wd = rand_packed(codec, d, inter, gen, (e,))
    x = (torch.randn(t, d, generator=gen) * 4).to(dtype)
    idx = torch.randint(0, e - 1, (t, k), generator=gen)      # expert e-1 never chosen: an empty expert
    if t > 1:
        idx[1, 0] = -1                                          # an empty slot (dynamic routing)
    wts = torch.rand(t, k, generator=gen)
    y = moe_triton.moe_experts_triton(*on(x, idx, wts, wg, wu, wd), limit, blocks=blocks).cpu()
    y_ref = moe.moe_experts_reference(x, idx, wts, wg, wu, wd, limit)
    assert y.dtype == dtype and y.shape == (t, d)
    assert_within(y, y_ref, moe_bound(x.float(), idx, wts, wg, wu, wd, limit, dtype))


def test_moe_schedule_covers_each_row_once():
    """Sorting and the device tile schedule: every routed slot in exactly one tile of its own expert."""
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, 6, (23, 3), generator=gen)
    idx[:, 0] = idx[:, 0].clamp(max=2)                          # experts 6.. unused, 3..5 sparse
    srt = moe.sort_by_expert(idx, torch.rand(23, 3, generator=gen), 8)
    flat = idx.reshape(-1)
    assert torch.equal(flat[srt.order][: int(srt.offsets[-1])], torch.sort(flat[flat >= 0]).values)
    e_t, r0, r1 = moe.tile_schedule(srt.offsets, 4, flat.numel())
    seen = torch.zeros(flat.numel(), dtype=torch.int64)
    for e, a, b in zip(e_t.tolist(), r0.tolist(), r1.tolist()):
        rows = torch.arange(a, min(b, a + 4))
        seen[rows] += 1
        assert bool((flat[srt.order[rows]] == e).all())
    assert torch.equal(seen, (torch.arange(flat.numel()) < int(srt.offsets[-1])).long())


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("form", list(quant.NVFP4Form))
def test_nvfp4_quant_kernel_bit_identical(form):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(19, 208, generator=gen) * torch.logspace(-7, 2, 208)   # tiny blocks: subnormal E4M3 scales
    x[2, :16] = 0.0
    x[3, 16:32] = -0.0
    x[4, :16] = 1e-12                                                         # block scale rounds to 0
    x[5, 32:48] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) * torch.tensor([1.0, -1.0] * 8)
    from v4convert.formats import nvfp4                        # the quantize codec
    conv = {quant.NVFP4Form.MODELOPT: nvfp4.NVFP4Convention.MODELOPT,
            quant.NVFP4Form.COMPRESSED_TENSORS: nvfp4.NVFP4Convention.COMPRESSED_TENSORS}[form]
    for xx in (x, x.to(torch.bfloat16)):
        p, s, g = (t.cpu() for t in quant_triton.nvfp4_quantize_triton(on(xx), form))
        pr, sr, gr = quant.nvfp4_quantize_reference(xx, form)
        assert torch.equal(p, pr) and torch.equal(s, sr) and torch.equal(g, gr)
        assert int((sr < 8).sum()) > 0, "no subnormal block scale exercised"
        f = nvfp4.nvfp4_quantize(xx, convention=conv)
        assert torch.equal(pr, f.packed) and torch.equal(sr, f.block_scale.view(torch.uint8))
        assert torch.equal(gr, f.global_scale)


@triton.jit
def _rounding_probe(s_ptr, v_ptr, b_ptr, c_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    s = tl.load(s_ptr + offs)
    v, b = _e4m3_rne(s)
    tl.store(v_ptr + offs, v)
    tl.store(b_ptr + offs, b)
    tl.store(c_ptr + offs, _e2m1_rne(s - 7.0))


def test_device_rounding_every_e4m3_value_and_tie():
    """The kernel's E4M3 and E2M1 round-to-nearest-even against torch's float8 cast and the reference encoder,
    on every E4M3 value, every midpoint, and the float32 neighbours of each midpoint."""

    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()       # 0 .. 448
    mids = (vals[1:] + vals[:-1]) / 2
    s = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(999.0))])
    s = torch.cat([s, torch.linspace(0, 14, 113)])
    n = triton.next_power_of_2(s.numel())
    s = torch.cat([s, torch.zeros(n - s.numel())]).contiguous()
    v, b, c = torch.empty(n), torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    s, v, b, c = on(s, v, b, c)
    _rounding_probe[(1,)](s, v, b, c, N=n)
    s, v, b, c = (t.cpu() for t in (s, v, b, c))
    want = s.to(torch.float8_e4m3fn)
    assert torch.equal(v, want.float())
    assert torch.equal(b, want.view(torch.uint8).to(torch.int32))
    assert torch.equal(c, quant.e2m1_encode_reference(s - 7.0).to(torch.int32))


# ---------------------------------------------------------------------------------------------- packing / CPU path
def test_pack_from_parts_nvfp4_conventions():
    """ModelOpt multiplier kept as is; compressed-tensors divisor converted to 1/g: values within one rounding."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8, generator=gen)
    ws = torch.randint(1, 0x7E, (5, 2), dtype=torch.uint8, generator=gen)
    exact = (torch.tensor(np.array(fp4.E2M1_VALUES, dtype=np.float64))[codes.long()]
             * torch.from_numpy(ws.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float64)).repeat_interleave(16, 1))
    g = torch.tensor(0.0123, dtype=torch.float32)
    parts = {"weight": fp4.pack_fp4(codes), "scale": ws.view(torch.float8_e4m3fn), "global_scale": g.reshape(1)}
    mo = pack_from_parts(Storage.NVFP4_MODELOPT, parts, (5, 32), "m.w")
    assert torch.equal(mo.dequantize(), (exact.float() * g).float())           # (code*ws) exact, one rounding
    ct = pack_from_parts(Storage.NVFP4_CT, parts, (5, 32), "c.w")
    truth = exact / float(g)
    assert bool(((ct.dequantize().double() - truth).abs() <= 2.0 ** -23 * truth.abs()).all())
    with pytest.raises(PackedWeightError, match="c.w: NVFP4 global scale"):
        pack_from_parts(Storage.NVFP4_CT, {**parts, "global_scale": torch.zeros(1)}, (5, 32), "c.w")


def test_cpu_path_is_tiled_and_matches_full_matmul(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    pw = rand_packed(Codec.NVFP4, 300, 64, gen)
    x = torch.randn(3, 2, 64, generator=gen)
    w_full = pw.dequantize()
    seen = []
    orig = PackedWeight.dequantize_rows

    def spy(self, n0, n1):
        seen.append(n1 - n0)
        return orig(self, n0, n1)

    monkeypatch.setattr(PackedWeight, "dequantize_rows", spy)
    y = packed_linear_reference(x, pw, tile_bytes=64 * 4 * 128)      # 128-row tiles
    assert seen == [128, 128, 44]
    seen.clear()
    y2 = packed_linear(x, pw)                                         # CPU dispatch = the tiled reference
    assert seen and max(seen) <= 300 and torch.equal(y, y2)
    assert_within(y.reshape(6, 300), (x.reshape(6, 64) @ w_full.T), accum_bound(x.reshape(6, 64), w_full,
                                                                                   torch.float32))


def test_stack_experts_rejects_mixed():
    gen = torch.Generator().manual_seed(2)
    a, b = rand_packed(Codec.MXFP4, 4, 32, gen), rand_packed(Codec.NVFP4, 4, 32, gen)
    with pytest.raises(PackedWeightError, match="expected mxfp4"):
        stack_experts([a, b], "layers.1.ffn.experts")
