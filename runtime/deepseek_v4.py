"""DeepSeek-V4 model (V4-Flash / V4-Pro) for the runtime: ``build(ck, device, dtype, max_seq_len, opts)``.

Module names are the published checkpoint names (``layers.N.attn.wq_a``, ``layers.N.hc_attn_fn``,
``layers.N.ffn.gate.tid2eid``, ``embed``, ``head``, ``hc_head_fn``, ``mtp.0.e_proj`` ...) except the expert
projections, held by the shared ``SwiGLU`` (``w1 -> gate_proj``, ``w3 -> up_proj``, ``w2 -> down_proj``).

Semantics: transformers 5.24 ``models/deepseek_v4/modeling_deepseek_v4.py`` (see ``runtime/DEVIATIONS.md``,
V4 section, for where it and DeepSeek's own ``inference/model.py`` differ). Activations of the residual
are ``[B, T, hc, D]`` (``hc = hc_mult`` hyper-connection streams).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from v4convert.errors import UserError

from v4convert.families.roles import Family

from .common import (DynamicRouting, Linear, LoadOptions, RMSNorm, RouterSpec, RuntimeLoadError, SwiGLU,
                     fill_from_checkpoint, gather_weights, moe_dispatch, rope_cos_sin, rope_inv_freq, route)
from .v4_args import V4Args
from .v4_attention import Attention, RopeTables, unit_rms


# ----------------------------------------------------------------------------------------------
# Hyper-connections
# ----------------------------------------------------------------------------------------------
def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int, eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixing weights of one hyper-connection and the collapsed block input.

    ``x [B, T, hc, D]``; ``fn [(2+hc)*hc, hc*D]``, ``base [(2+hc)*hc]``, ``scale [3]`` (pre, post, comb).
    Returns ``post [B, T, hc]``, ``comb [B, T, hc, hc]`` (Sinkhorn-normalised, float32) and
    ``collapsed = sum_i pre_i x_i [B, T, D]`` (transformers ``DeepseekV4HyperConnection``).
    """
    B, T, hc, _ = x.shape
    mixes = F.linear(unit_rms(x.reshape(B, T, -1).float(), norm_eps), fn.float())
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * s_pre + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * s_post + post_b)
    comb = torch.softmax(comb_w.view(B, T, hc, hc) * s_comb + comb_b.view(hc, hc), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    collapsed = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
    return post, comb, collapsed


def hc_post(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams ``post_i * out + sum_j comb[j, i] x_j``: ``x [B,T,hc,D]``, ``out [B,T,D]`` -> ``[B,T,hc,D]``."""
    dt = x.dtype
    return post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), x)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """Final collapse of the ``hc`` streams: ``x [B,T,hc,D]`` -> ``[B,T,D]``; ``fn [hc, hc*D]``, ``base [hc]``,
    ``scale [1]`` (transformers ``DeepseekV4HyperHead``)."""
    B, T = x.shape[:2]
    mixes = F.linear(unit_rms(x.reshape(B, T, -1).float(), norm_eps), fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


def _hc_params(module: nn.Module, prefix: str, rows: int, cols: int, n_scale: int) -> None:
    module.register_parameter(f"{prefix}_fn", nn.Parameter(torch.empty(rows, cols), requires_grad=False))
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.empty(rows), requires_grad=False))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.empty(n_scale), requires_grad=False))


# ----------------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------------
class Gate(nn.Module):
    """Router. ``weight [E, D]``; top-k layers: ``bias [E]`` (selection only); hash layers: ``tid2eid [V, k]``."""

    def __init__(self, dim: int, spec: RouterSpec, vocab: int, hashed: bool) -> None:
        super().__init__()
        self.spec, self.hashed = spec, hashed
        self.weight = nn.Parameter(torch.empty(spec.n_experts, dim), requires_grad=False)
        if hashed:
            self.register_buffer("tid2eid", torch.empty(vocab, spec.top_k, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.empty(spec.n_experts), requires_grad=False)
        self.dynamic: DynamicRouting | None = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, D]``, ``ids [N]`` -> ``(weights [N, K], experts [N, K])``."""
        logits = F.linear(x, self.weight)
        if self.hashed:        # fixed experts per token id; weights from the learned scores
            idx = self.tid2eid[ids].long()
            return gather_weights(self.spec.score_func(logits.float()), idx, self.spec), idx
        return route(logits, self.spec, self.bias, self.dynamic)


class MoE(nn.Module):
    """Routed experts (SwiGLU with clamp) plus shared experts (also clamped, as in transformers)."""

    def __init__(self, a: V4Args, hashed: bool) -> None:
        super().__init__()
        arch = a.arch
        self.gate = Gate(arch.hidden, a.router, arch.vocab, hashed)
        self.experts = nn.ModuleList(SwiGLU(arch.hidden, arch.moe_inter, a.swiglu_limit)
                                     for _ in range(arch.n_experts))
        self.shared_experts = SwiGLU(arch.hidden, arch.moe_inter * arch.n_shared, a.swiglu_limit)
        self.tokens_seen = 0           # experts-per-token counters (``Transformer.routing_stats``)
        self.experts_used = 0

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        w, idx = self.gate(flat, ids.reshape(-1))
        self.tokens_seen += flat.shape[0]
        self.experts_used += int((idx >= 0).sum())
        return (moe_dispatch(flat, idx, w, self.experts) + self.shared_experts(flat)).view(B, T, D)


# ----------------------------------------------------------------------------------------------
# Blocks and model
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One V4 block: ``hc_attn`` -> attention -> ``hc_ffn`` -> MoE on ``hc`` residual streams."""

    def __init__(self, a: V4Args, block: int, hashed: bool) -> None:
        super().__init__()
        arch = a.arch
        hc = arch.hc_mult
        self.iters, self.hc_eps, self.eps = a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps
        self.attn_norm = RMSNorm(arch.hidden, a.rms_norm_eps)
        self.ffn_norm = RMSNorm(arch.hidden, a.rms_norm_eps)
        self.attn = Attention(a, block)
        self.ffn = MoE(a, hashed)
        for p in ("hc_attn", "hc_ffn"):
            _hc_params(self, p, (2 + hc) * hc, hc * arch.hidden, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, start_pos: int, rope: RopeTables) -> torch.Tensor:
        post, comb, h = hc_pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.iters, self.hc_eps,
                               self.eps)
        x = hc_post(x, self.attn(self.attn_norm(h), start_pos, rope), post, comb)
        post, comb, h = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.iters, self.hc_eps,
                               self.eps)
        return hc_post(x, self.ffn(self.ffn_norm(h), ids), post, comb)


class MTPBlock(Block):
    """Multi-token-prediction block ``mtp.i``: a block plus ``e_proj``/``h_proj``/``enorm``/``hnorm``/``norm``
    and its own ``hc_head_*``. Loaded so no weight is dropped; not run by ``Transformer.forward``."""

    def __init__(self, a: V4Args, block: int) -> None:
        super().__init__(a, block, hashed=False)
        arch = a.arch
        self.e_proj = Linear(arch.hidden, arch.hidden)
        self.h_proj = Linear(arch.hidden, arch.hidden)
        self.enorm = RMSNorm(arch.hidden, a.rms_norm_eps)
        self.hnorm = RMSNorm(arch.hidden, a.rms_norm_eps)
        self.norm = RMSNorm(arch.hidden, a.rms_norm_eps)
        _hc_params(self, "hc_head", arch.hc_mult, arch.hc_mult * arch.hidden, 1)


class Transformer(nn.Module):
    """``model(input_ids [B, T], start_pos=0) -> float32 logits [B, T, V]`` with preallocated caches."""

    family = Family.V4

    def __init__(self, a: V4Args, n_mtp: int) -> None:
        super().__init__()
        arch = a.arch
        self.args = a
        self.embed = nn.Embedding(arch.vocab, arch.hidden)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(a, i, a.hash_layers[i]) for i in range(arch.n_layers))
        self.norm = RMSNorm(arch.hidden, a.rms_norm_eps)
        self.head = Linear(arch.hidden, arch.vocab)
        _hc_params(self, "hc_head", arch.hc_mult, arch.hc_mult * arch.hidden, 1)
        self.mtp = nn.ModuleList(MTPBlock(a, arch.n_layers + i) for i in range(n_mtp))
        self.max_seq_len = 0
        self.max_batch_size = 0
        self._rope: RopeTables | None = None

    def allocate(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Caches of every main layer and the two rope tables (float32 ``[max_seq_len, rd/2]``)."""
        a = self.args
        for layer in self.layers:
            layer.attn.allocate(max_batch_size, max_seq_len, dtype, device)
        pos = torch.arange(max_seq_len, device=device)
        inv_main, s_main = rope_inv_freq(a.rope_dim, a.rope_theta)
        inv_comp, s_comp = rope_inv_freq(a.rope_dim, a.compress_rope_theta, a.yarn)
        self._rope = RopeTables(rope_cos_sin(inv_main.to(device), pos, s_main),
                                rope_cos_sin(inv_comp.to(device), pos, s_comp))
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size

    def set_dynamic_routing(self, dynamic: DynamicRouting | None) -> None:
        """Opt-in variable experts per token on the top-k layers (hash layers keep their fixed experts)."""
        for layer in self.layers:
            if not layer.ffn.gate.hashed:
                layer.ffn.gate.dynamic = dynamic

    def routing_stats(self) -> dict[str, float]:
        """Mean routed experts per token over MoE layer calls (hash layers included) since the last reset."""
        moes = [layer.ffn for layer in self.layers]
        toks = sum(m.tokens_seen for m in moes)
        used = sum(m.experts_used for m in moes)
        return {"experts_per_token": used / toks if toks else 0.0, "token_layer_calls": float(toks)}

    def reset_routing_stats(self) -> None:
        for layer in self.layers:
            layer.ffn.tokens_seen = layer.ffn.experts_used = 0

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T = input_ids.shape
        if self._rope is None:
            raise RuntimeError("model caches are not allocated (build() allocates them)")
        if B > self.max_batch_size or start_pos < 0 or start_pos + T > self.max_seq_len:
            raise UserError(f"input [B={B}, T={T}] at start_pos {start_pos} exceeds max_batch_size "
                             f"{self.max_batch_size} / max_seq_len {self.max_seq_len}")
        h = self.embed(input_ids)                                                # [B, T, D]
        x = h.unsqueeze(2).expand(B, T, self.args.arch.hc_mult, -1).contiguous()  # [B, T, hc, D]
        for layer in self.layers:
            x = layer(x, input_ids, start_pos, self._rope)
        h = hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.args.hc_eps,
                    self.args.rms_norm_eps)
        return self.head(self.norm(h)).float()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
_EXPERT_W = re.compile(r"^(.*\.(?:experts\.\d+|shared_experts))\.w([123])\.weight$")
_W_NAME = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
# Kept in float32 whatever the compute dtype (transformers ``_keep_in_fp32_modules_strict``): hyper-connection
# weights, sinks, compressor position biases, router bias, norm weights; the hash table stays int.
_KEEP_F32 = ("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias", "norm.weight", "tid2eid")


def model_name(name: str) -> str:
    """Runtime parameter name of a canonical (published) V4 tensor name."""
    m = _EXPERT_W.match(name)
    return f"{m.group(1)}.{_W_NAME[m.group(2)]}.weight" if m else name


def build(ck, device: torch.device, dtype: torch.dtype, max_seq_len: int,
          opts: LoadOptions = LoadOptions()) -> Transformer:
    """Build on the meta device, assign every checkpoint tensor (dequantized), allocate caches on ``device``.

    ``opts.fake_quant`` (opt-in) also simulates DeepSeek's FP8 KV cache (non-rope channels, blocks of 64).
    MTP blocks are built when the checkpoint holds ``mtp.*`` tensors (transformers' ``save_pretrained`` drops
    them); a partial MTP block fails loudly (``RuntimeLoadError``).
    """
    src = str(getattr(ck, "root", "checkpoint")) + "/config.json"
    a = V4Args.from_config(ck.config, src)
    names = ck.names()
    n_mtp = len({n.split(".")[1] for n in names if n.startswith("mtp.")})
    if n_mtp > a.arch.n_mtp:
        raise RuntimeLoadError(f"{src}: checkpoint has {n_mtp} MTP blocks, config num_nextn_predict_layers "
                               f"is {a.arch.n_mtp}")
    with torch.device("meta"):
        model = Transformer(a, n_mtp)
    if opts.shard is not None:      # distributed: this rank's part only (runtime/distributed.py)
        opts.shard(model)
    fill_from_checkpoint(model, ck, model_name, dtype, device, keep_dtype=_KEEP_F32, fake_quant=opts.fake_quant,
                         packed=opts.packed, act_quant=opts.act_quant)
    for mod in model.modules():
        if isinstance(mod, Gate) and mod.hashed:
            tab = mod.tid2eid
            if tab.dtype.is_floating_point:
                if torch.any(tab != tab.round()):
                    raise RuntimeLoadError(f"{src}: tid2eid holds non-integer expert ids")
            tab = tab.long()
            if tab.min() < 0 or tab.max() >= a.arch.n_experts:
                raise RuntimeLoadError(f"{src}: tid2eid expert ids outside [0, {a.arch.n_experts})")
            mod.tid2eid = tab.to(device)
    model.allocate(opts.max_batch_size, max_seq_len, dtype, device)
    for layer in model.layers:
        layer.attn.set_kv_quant(opts.fake_quant)
    model.set_dynamic_routing(opts.dynamic_routing)
    return model.eval()
