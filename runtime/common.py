"""Building blocks shared by every family's model code (V3/V3.2 in ``deepseek_v3.py``, V4 in ``deepseek_v4.py``).

Conventions (all modules):
- activations are ``[B, T, D]`` (batch, tokens, features) unless stated; ``N = B*T`` for flattened tokens;
- linear weights are ``[out, in]`` like the checkpoints;
- default numerics are exact float math on dequantized weights, matching transformers 5.x; the
  opt-in ``FakeQuant`` reproduces DeepSeek's ``inference/model.py`` FP8 activation simulation.

Sources (read for facts, not copied): DeepSeek-V3 ``inference/model.py`` (gate, MLA, YaRN),
transformers 5.24 ``models/deepseek_v3|v32|v4/modeling_*.py`` and ``modeling_rope_utils._compute_yarn_parameters``.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from v4convert.errors import UserError

FP8_E4M3_MAX = 448.0
ACT_BLOCK = 128          # DeepSeek act_quant block along the last dim


class RuntimeLoadError(UserError):
    """A checkpoint that the runtime cannot build or fill (missing/unexpected tensor, bad config)."""


# ----------------------------------------------------------------------------------------------
# Activation fake-quant (opt-in; DeepSeek ``act_quant`` + ``fp8_gemm`` semantics)
# ----------------------------------------------------------------------------------------------
class FakeQuant(enum.Enum):
    """How a ``Linear`` treats its input activation before the matmul."""
    NONE = "none"              # exact (transformers semantics; default)
    FP8_BLOCK = "fp8_block"    # e4m3 per 128-element block, scale = amax / 448 (DeepSeek V3/R1)
    FP8_BLOCK_UE8M0 = "fp8_block_ue8m0"  # same, scale rounded up to a power of two (V3.1 ``scale_fmt: ue8m0``, V4)


def fake_quant_fp8_act(x: torch.Tensor, pow2_scale: bool = False, block: int = ACT_BLOCK) -> torch.Tensor:
    """Quantize-dequantize ``x [..., K]`` to FP8 e4m3 per ``block`` along K.

    Mirrors DeepSeek ``kernel.act_quant``: ``s = amax(|x_blk|) / 448`` (``pow2_scale``: ``2**ceil(log2 s)``),
    ``q = e4m3(x / s)``, result ``q * s`` in ``x.dtype``. DeepSeek requires ``K % 128 == 0``; a partial last
    block (tiny test models) is quantized on its own (zero padding does not change its amax).
    """
    K = x.shape[-1]
    pad = (-K) % block
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()
    xb = xf.unflatten(-1, ((K + pad) // block, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = amax / FP8_E4M3_MAX
    if pow2_scale:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xb / s).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2)[..., :K].to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Linear and norms
# ----------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """``y = x @ W.T (+ b)``; ``W [out, in]``.

    Two storages: ``weight`` (dense float, dequantized at load; the default) or ``packed`` (a
    ``v4convert.kernels.packed.PackedWeight`` kept as stored: FP8-block, NVFP4, MXFP4; ``load(packed=True)``),
    in which case ``weight`` is ``None`` and ``forward`` runs ``kernels.packed.packed_linear`` (Triton on CUDA,
    tiled dequantize-and-matmul on CPU). Models call linears only through this class.
    ``fake_quant``: opt-in activation simulation (set by the loader only for linears whose published
    weight was quantized, as DeepSeek's ``linear`` only quantizes activations for FP8 weights).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.fake_quant = FakeQuant.NONE
        self.act_quant = None                    # W4A4 input quantizer (runtime/act_quant.py ActQuant) or None
        self.packed = None                       # PackedWeight when packed; then weight is None
        self.packed_dtype: torch.dtype | None = None   # model dtype for dense_weight() of a packed weight

    def set_packed(self, pw, dtype: torch.dtype) -> None:
        """Hold ``pw`` (``PackedWeight`` of logical shape ``[out, in]``) instead of a dense weight."""
        if tuple(pw.shape) != (self.out_features, self.in_features):
            raise RuntimeLoadError(f"{pw.name}: packed shape {tuple(pw.shape)} != linear "
                                   f"{(self.out_features, self.in_features)}")
        self.packed, self.packed_dtype = pw, dtype
        self._parameters["weight"] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant is not FakeQuant.NONE:
            x = fake_quant_fp8_act(x, pow2_scale=self.fake_quant is FakeQuant.FP8_BLOCK_UE8M0)
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.packed is not None:
            from v4convert.kernels.packed import packed_linear
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense float ``[out, in]`` tensor (absorbed MLA reads ``kv_b_proj`` this way; a packed
        weight is dequantized on each call, as DeepSeek's ``weight_dequant`` does)."""
        if self.packed is not None:
            return self.packed.dequantize().to(self.packed_dtype)
        return self.weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in float32; ``weight [dim]``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings and YaRN
# ----------------------------------------------------------------------------------------------
class RopeStyle(enum.Enum):
    """Which channels form a rotated pair."""
    INTERLEAVED = "interleaved"  # pairs (2i, 2i+1), rotated in place (DeepSeek official; HF ``rope_interleave=True``)
    HALF = "half"                # pairs (i, i + D/2) (``rotate_half``; V3.2 indexer; HF ``rope_interleave=False``)


@dataclass(frozen=True)
class Yarn:
    """YaRN parameters (``rope_scaling`` / ``rope_parameters`` with ``type|rope_type == "yarn"``)."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None   # explicit cos/sin scale; None = derived as transformers does
    truncate: bool = True


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, yarn: Yarn | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim/2]`` (float32) and the cos/sin scale (``attention_factor``).

    Plain RoPE: ``theta ** (-2i/dim)``, scale 1. YaRN: transformers' ``_compute_yarn_parameters`` (same as
    DeepSeek's ``precompute_freqs_cis``): blend interpolated/extrapolated frequencies with a linear ramp
    between the correction dims of ``beta_fast``/``beta_slow``; scale = ``mscale(f, mscale)/mscale(f, mscale_all_dim)``.
    """
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    f = yarn.factor

    def corr_dim(n_rot: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(yarn.beta_fast), corr_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    inv = (1.0 / (f * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    if yarn.attention_factor is not None:
        att = float(yarn.attention_factor)
    elif yarn.mscale and yarn.mscale_all_dim:
        att = yarn_get_mscale(f, yarn.mscale) / yarn_get_mscale(f, yarn.mscale_all_dim)
    else:
        att = yarn_get_mscale(f)
    return inv, att


def yarn_softmax_scale(head_dim: int, yarn: Yarn | None) -> float:
    """Attention softmax scale ``head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` under YaRN
    (DeepSeek ``MLA.softmax_scale``; transformers ``yarn_apply_mscale``)."""
    s = head_dim ** -0.5
    if yarn is not None and yarn.mscale_all_dim:
        m = yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
        s = s * m * m
    return s


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, dim/2]`` (float32) for integer ``positions [T]``, multiplied by ``scale``."""
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    return ang.cos() * scale, ang.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: RopeStyle) -> torch.Tensor:
    """Rotate ``x [..., T, H, D]`` (or ``[..., T, D]`` with ``cos/sin`` pre-shaped) by ``cos, sin [T, D/2]``.

    ``cos/sin`` are broadcast over the head dim (inserted before D) when ``x.dim() == cos.dim() + 1``.
    Output keeps the input channel layout. Math per pair (a, b): ``(a c - b s, b c + a s)``.
    """
    if x.dim() == cos.dim() + 2:       # [..., T, H, D] with cos [T, D/2] -> [T, 1, D/2]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if style is RopeStyle.INTERLEAVED:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate/up ``[inter, dim]``, down ``[dim, inter]``.

    ``limit`` (V4 ``swiglu_limit``): clamp ``gate`` to ``<= limit`` and ``up`` to ``[-limit, limit]``
    before the product (transformers ``DeepseekV4MLP``); ``None`` = no clamp (V3).
    """

    def __init__(self, dim: int, inter: int, limit: float | None = None) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter)
        self.up_proj = Linear(dim, inter)
        self.down_proj = Linear(inter, dim)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None and self.limit > 0:
            g = g.clamp(max=self.limit)
            u = u.clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(g) * u)


def moe_dispatch(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
    """Weighted sum over routed experts: ``out[n] = sum_k weights[n,k] * experts[idx[n,k]](x[n])``.

    ``x [N, D]``, ``idx [N, K]`` int (``-1`` = empty slot, used by dynamic routing), ``weights [N, K]``.
    Tokens are sorted by expert and only experts that received tokens run. Experts are accumulated in
    ascending expert order into a zero tensor (same summation order as transformers' eager experts).
    Returns ``[N, D]`` in ``x.dtype``.
    """
    N, K = idx.shape
    out = torch.zeros_like(x)
    if N == 1:      # decode fast path: same ascending-expert accumulation order, no sort/bincount/index ops
        w_row = weights[0].to(x.dtype)
        for e, k in sorted((e, k) for k, e in enumerate(idx[0].tolist()) if e >= 0):
            out = out + experts[e](x) * w_row[k]
        return out
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat[flat >= 0], minlength=len(experts)).tolist()
    start = int((flat < 0).sum())          # empty slots (-1) sort first
    w_flat = weights.reshape(-1)
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sel = order[start:start + c]
        start += c
        tok = sel // K
        y = experts[e](x[tok]) * w_flat[sel, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------
class ScoreFunc(enum.Enum):
    """Router score function (config ``scoring_func``)."""
    SIGMOID = "sigmoid"            # V3 family
    SOFTMAX = "softmax"
    SQRTSOFTPLUS = "sqrtsoftplus"  # V4: sqrt(softplus(x))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self is ScoreFunc.SIGMOID:
            return logits.sigmoid()
        if self is ScoreFunc.SOFTMAX:
            return logits.softmax(dim=-1)
        return F.softplus(logits).sqrt()


@dataclass(frozen=True)
class RouterSpec:
    """Static routing facts of one MoE layer."""
    n_experts: int
    top_k: int
    score_func: ScoreFunc
    n_group: int = 1                 # group-limited routing (V3: 8); 1 = off
    topk_group: int = 1              # groups kept
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class DynamicRouting:
    """Opt-in variable experts per token: keep the fewest top candidates whose normalised weights reach
    ``top_p`` (cumulative, candidates sorted by weight), at least ``k_min`` and at most ``k_max``."""
    top_p: float
    k_min: int = 1
    k_max: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0 or not 1 <= self.k_min <= self.k_max:
            raise UserError(f"DynamicRouting needs 0 < top_p <= 1 and 1 <= k_min <= k_max, got {self}")


def select_experts(scores: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None,
                   k: int | None = None) -> torch.Tensor:
    """Indices ``[N, k]`` of the chosen experts (unsorted as ``torch.topk(sorted=False)``, like transformers).

    ``scores [N, E]`` float32 (after ``spec.score_func``); selection uses ``scores + bias``. With
    ``n_group > 1``: each group is scored by the sum of its top-2 biased scores, ``topk_group`` groups
    kept, the others masked to -inf (DeepSeek V3 ``Gate``; transformers ``DeepseekV3TopkRouter``).
    """
    k = spec.top_k if k is None else k
    choice = scores if bias is None else scores + bias.float()
    if spec.n_group > 1:
        N, E = choice.shape
        g = choice.view(N, spec.n_group, E // spec.n_group)
        group_scores = g.topk(2, dim=-1)[0].sum(dim=-1)                       # [N, n_group]
        keep = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0).bool()
        mask = mask.unsqueeze(-1).expand(N, spec.n_group, E // spec.n_group).reshape(N, E)
        choice = choice.masked_fill(~mask, float("-inf"))
    return torch.topk(choice, k=k, dim=-1, sorted=False)[1]


def gather_weights(scores: torch.Tensor, idx: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Routing weights ``[N, K]``: unbiased ``scores`` of ``idx`` (``-1`` slots -> 0), normalised when
    ``spec.norm_topk_prob`` (denominator ``+1e-20``), times ``routed_scaling_factor``."""
    w = scores.gather(1, idx.clamp_min(0)) * (idx >= 0)
    if spec.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * spec.routed_scaling_factor


def route(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None,
          dynamic: DynamicRouting | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full router: ``logits [N, E]`` -> ``(weights [N, K], idx [N, K])`` with K = top_k (default) or
    ``dynamic.k_max`` (then unused slots have ``idx == -1`` and weight 0).

    Dynamic mode: candidates = the ``k_max`` best by biased (group-limited) score; their unbiased scores
    are normalised to sum 1 and sorted; keep the shortest prefix reaching ``top_p``, clamped to
    ``[k_min, k_max]``; final weights as ``gather_weights`` over the kept experts.
    """
    scores = spec.score_func(logits.float())
    if dynamic is None:
        idx = select_experts(scores, spec, bias)
        return gather_weights(scores, idx, spec), idx
    reachable = spec.n_experts if spec.n_group <= 1 else spec.topk_group * (spec.n_experts // spec.n_group)
    k_max = min(dynamic.k_max, reachable)      # never pick experts of masked groups
    cand = select_experts(scores, spec, bias, k=k_max)
    p = scores.gather(1, cand)
    p = p / (p.sum(-1, keepdim=True) + 1e-20)
    p_sorted, order = p.sort(dim=-1, descending=True)
    cand = cand.gather(1, order)
    before = p_sorted.cumsum(-1) - p_sorted                 # mass of strictly better candidates
    rank = torch.arange(k_max, device=logits.device)
    keep = (before < dynamic.top_p) | (rank < dynamic.k_min)
    idx = torch.where(keep, cand, torch.full_like(cand, -1))
    return gather_weights(scores, idx, spec), idx


# ----------------------------------------------------------------------------------------------
# Loading helpers (shared by every family's ``build``)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadOptions:
    """Options every family builder accepts: ``build(ck, device, dtype, max_seq_len, opts) -> nn.Module``."""
    max_batch_size: int = 1
    fake_quant: FakeQuant = FakeQuant.NONE      # opt-in DeepSeek activation simulation on quantized linears
    dynamic_routing: DynamicRouting | None = None
    packed: bool = False                        # keep quantized linear weights packed (pass to fill_from_checkpoint)
    act_quant: bool = True                      # W4A4 input fake-quant where the config declares it (act_quant.py)
    # distributed (runtime/distributed.py): cuts the meta model to this rank's part before it is filled
    shard: Callable[[nn.Module], None] | None = None


def materialize(module: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype | None,
                device: torch.device | str) -> None:
    """Replace parameter or buffer ``name`` (dotted path) of ``module`` by ``value`` (cast to ``dtype`` if given),
    checking the shape against the declared (possibly meta) tensor. No extra copy beyond the cast."""
    *path, leaf = name.split(".")
    mod = module
    for p in path:
        mod = getattr(mod, p)
    old = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
    if old is None and leaf not in mod._buffers:
        raise RuntimeLoadError(f"{name}: model has no such parameter")
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise RuntimeLoadError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)}")
    t = value.to(device=device, dtype=dtype if dtype is not None else value.dtype)
    if t.data_ptr() == value.data_ptr():      # no cast happened: own the memory (value may view an mmapped shard)
        t = t.clone()
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


def meta_leftovers(module: nn.Module) -> list[str]:
    """Names of parameters and persistent buffers still on the meta device (never filled). Caches and
    rope tables are non-persistent buffers allocated after loading, so they are not listed."""
    return [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]


def fill_from_checkpoint(model: nn.Module, ck, rename: Callable[[str], str | None], dtype: torch.dtype,
                         device: torch.device | str, keep_dtype: Iterable[str] = (),
                         fake_quant: FakeQuant = FakeQuant.NONE, packed: bool = False, act_quant: bool = False) -> None:
    """Assign every logical tensor of ``ck`` (``v4convert.checkpoint.Checkpoint``) to ``model``.

    ``rename(ckpt_name) -> model name`` (``None`` is not allowed to drop silently: it raises). Tensors are
    dequantized one at a time (float32 from the reader) and cast to ``dtype``, except parameters whose
    model name ends with a suffix in ``keep_dtype`` (e.g. int64 hash tables), kept as stored.
    ``fake_quant`` is set on every ``Linear`` whose checkpoint weight is stored quantized (FP8/FP4).
    ``packed``: such ``Linear`` weights are kept packed (``kernels.packed.from_checkpoint``), never dequantized.
    ``act_quant``: FP4 linears whose config declares 4-bit input activations get that quantizer (``act_quant.py``).
    Raises ``RuntimeLoadError`` on an unknown tensor or on model parameters left unfilled.
    """
    keep = tuple(keep_dtype)
    if act_quant:
        from .act_quant import plan_for
        aq = plan_for(ck)
    else:
        aq = {}
    for name in ck.names():
        target = rename(name)
        if target is None:
            raise RuntimeLoadError(f"{name}: no place for this tensor in the runtime model")
        quantized = target.endswith(".weight") and ck.tensor_info(name).storage.is_quantized
        owner = model.get_submodule(target[: -len(".weight")]) if quantized else None
        if not isinstance(owner, Linear):
            owner = None
        if packed and owner is not None:
            owner.set_packed(_owned_packed(ck, name, device), dtype)
        else:
            materialize(model, target, ck.dequantize(name), None if target.endswith(keep) else dtype, device)
        if owner is not None and fake_quant is not FakeQuant.NONE:
            owner.fake_quant = fake_quant
        if owner is not None and name in aq:
            owner.act_quant = aq[name]
    left = meta_leftovers(model)
    if left:
        raise RuntimeLoadError(f"checkpoint lacks {len(left)} tensors the model needs, e.g. {left[:3]}")


def _owned_packed(ck, name: str, device):
    """``kernels.packed.from_checkpoint`` with every tensor copied out of the mmapped shards onto ``device``."""
    from v4convert.kernels.packed import PackedWeight, from_checkpoint
    pw = from_checkpoint(ck, name)
    return PackedWeight(pw.codec, pw.data.to(device, copy=True), pw.scale.to(device, copy=True),
                        pw.row_scale.to(device, copy=True), pw.shape, pw.name)


def packed_linears(model: nn.Module) -> int:
    """Number of ``Linear`` modules holding a packed weight."""
    return sum(1 for m in model.modules() if isinstance(m, Linear) and m.packed is not None)
