"""DeepSeek V3 / R1 / V3.1 (``deepseek_v3``) and V3.2 (``deepseek_v32``) in plain PyTorch.

Structure follows DeepSeek's ``inference/model.py`` (absorbed MLA over the compressed cache, static caches,
``model(ids, start_pos)``); numerics follow transformers 5.24 ``DeepseekV3ForCausalLM`` /
``DeepseekV32ForCausalLM`` (see ``runtime/DEVIATIONS.md``). Module and parameter names equal the published
HF tensor names (``model.layers.N.self_attn.q_a_proj.weight`` ...), so loading is a 1:1 assignment.

Per layer the cache holds ``kv_a_layernorm(c_kv) [kv_lora]`` + rotated ``k_pe [rope]`` per token (576 for
the 671B model, not per head), plus the V3.2 indexer keys ``[index_head_dim]``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from v4convert.families.roles import Family

from .args import ModelArgs
from .common import (DynamicRouting, Linear, LoadOptions, RMSNorm, RopeStyle, RuntimeLoadError, SwiGLU,
                     apply_rope, fill_from_checkpoint, moe_dispatch, rope_inv_freq, route, yarn_softmax_scale)
from v4convert.errors import UserError


class SequenceTooLong(UserError):
    """A forward call that would write past the preallocated KV cache."""


class Caches(nn.Module):
    """Static per-layer caches ``[max_batch, max_seq, dim]`` (non-persistent buffers, allocated after load)."""

    def __init__(self, dims: dict[str, int], max_batch: int, max_seq: int, device, dtype) -> None:
        super().__init__()
        for name, d in dims.items():
            self.register_buffer(name, torch.zeros(max_batch, max_seq, d, device=device, dtype=dtype), persistent=False)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
class Indexer(nn.Module):
    """V3.2 lightning indexer (transformers ``DeepseekV32Indexer``): picks ``index_topk`` keys per query.

    score[b,s,t] = sum_h w[b,s,h] * Hi^-0.5 * relu(Di^-0.5 * q[b,s,h,:] . k[b,t,:]), with q from ``wq_b(q_resid)``,
    ``k = LayerNorm(wk(x))``, non-interleaved (half) RoPE on the first ``rope`` channels of q and k.
    """

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        ar = a.arch
        self.n_heads, self.head_dim, self.rope_dim, self.topk = ar.index_heads, ar.index_dim, ar.rope, a.index_topk
        self.wq_b = Linear(ar.q_lora, ar.index_heads * ar.index_dim)
        self.wk = Linear(ar.hidden, ar.index_dim)
        self.k_norm = nn.LayerNorm(ar.index_dim, eps=1e-6)
        self.weights_proj = Linear(ar.hidden, ar.index_heads)
        self.caches: Caches | None = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat((apply_rope(x[..., :r], cos, sin, RopeStyle.HALF), x[..., r:]), dim=-1)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, start_pos: int, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B,T,D]``, ``q_resid [B,T,q_lora]``, ``mask [T,S]`` additive causal -> bool keep ``[B,T,S]``."""
        B, T, _ = x.shape
        end = start_pos + T
        q = self._rope(self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = self._rope(self.k_norm(self.wk(x)), cos, sin)                      # [B,T,Di]
        self.caches.k[:B, start_pos:end] = k
        keys = self.caches.k[:B, :end]
        scores = torch.einsum("bshd,btd->bsht", q.float(), keys.float()) * self.head_dim ** -0.5
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5   # [B,T,Hi]
        index = torch.einsum("bsh,bsht->bst", w, F.relu(scores)) + mask
        k_sel = min(self.topk, end)
        # Stable sort instead of topk: exact ties (relu zeroes every head) then resolve to the lowest position,
        # identically in prefill and decode (topk's tie order is unspecified; see DEVIATIONS.md).
        top = index.sort(dim=-1, descending=True, stable=True).indices[..., :k_sel]
        return torch.zeros_like(index, dtype=torch.bool).scatter_(-1, top, True)


class MLA(nn.Module):
    """Multi-head latent attention, absorbed form (DeepSeek ``MLA`` with ``attn_impl="absorb"``).

    q: ``q_b_proj(q_a_layernorm(q_a_proj(x))) -> [B,T,H,nope+rope]``; kv: ``kv_a_proj_with_mqa(x) -> c_kv [kv_lora]
    | k_pe [rope]``. ``kv_b_proj [H*(nope+v), kv_lora]`` is folded into q (nope part) and the output (v part).
    """

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        ar = a.arch
        self.n_heads, self.nope, self.rope, self.v_dim, self.kv_lora = ar.n_heads, ar.nope, ar.rope, ar.v_head, ar.kv_lora
        self.q_a_proj = Linear(ar.hidden, ar.q_lora)
        self.q_a_layernorm = RMSNorm(ar.q_lora)              # eps 1e-6 (transformers default; not rms_norm_eps)
        self.q_b_proj = Linear(ar.q_lora, ar.n_heads * (ar.nope + ar.rope))
        self.kv_a_proj_with_mqa = Linear(ar.hidden, ar.kv_lora + ar.rope)
        self.kv_a_layernorm = RMSNorm(ar.kv_lora)
        self.kv_b_proj = Linear(ar.kv_lora, ar.n_heads * (ar.nope + ar.v_head))
        self.o_proj = Linear(ar.n_heads * ar.v_head, ar.hidden)
        self.indexer = Indexer(a) if a.family is Family.V32 else None
        self.style = RopeStyle.INTERLEAVED if a.rope_interleave else RopeStyle.HALF
        self.softmax_scale = yarn_softmax_scale(ar.nope + ar.rope, a.yarn)
        self.caches: Caches | None = None

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        end = start_pos + T
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.style)
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope], dim=-1)
        self.caches.kv[:B, start_pos:end] = self.kv_a_layernorm(kv)
        self.caches.pe[:B, start_pos:end] = apply_rope(k_pe, cos, sin, self.style)
        wkv_b = self.kv_b_proj.dense_weight().view(self.n_heads, self.nope + self.v_dim, self.kv_lora)
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.nope])
        kv_c, pe_c = self.caches.kv[:B, :end], self.caches.pe[:B, :end]
        scores = (torch.einsum("bshc,btc->bsht", q_abs, kv_c)
                  + torch.einsum("bshr,btr->bsht", q_pe, pe_c)) * self.softmax_scale
        scores = scores + mask[None, :, None, :]
        if self.indexer is not None:
            keep = self.indexer(x, q_resid, start_pos, cos, sin, mask)          # [B,T,S]
            scores = scores.masked_fill(~keep[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        o = torch.einsum("bsht,btc->bshc", p, kv_c)
        o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, -self.v_dim:])
        return self.o_proj(o.flatten(2))


# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------
class Gate(nn.Module):
    """Router: ``weight [E, D]`` and selection bias ``e_score_correction_bias [E]`` (float32 math)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.spec = a.router
        self.weight = nn.Parameter(torch.empty(a.arch.n_experts, a.arch.hidden), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(a.arch.n_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, dynamic: DynamicRouting | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.spec, self.e_score_correction_bias, dynamic)


class MoE(nn.Module):
    """Routed experts + shared expert. ``dynamic`` (opt-in) and the experts-per-token counters live here."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        ar = a.arch
        self.gate = Gate(a)
        self.experts = nn.ModuleList(SwiGLU(ar.hidden, ar.moe_inter) for _ in range(ar.n_experts))
        self.shared_experts = SwiGLU(ar.hidden, ar.moe_inter * ar.n_shared)
        self.dynamic: DynamicRouting | None = None
        self.tokens_seen = 0
        self.experts_used = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, idx = self.gate(flat, self.dynamic)
        self.tokens_seen += flat.shape[0]
        self.experts_used += int((idx >= 0).sum())
        routed = moe_dispatch(flat, idx, w, self.experts).view(shape)
        return routed + self.shared_experts(x)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.arch.hidden, a.rms_norm_eps)
        self.self_attn = MLA(a)
        self.post_attention_layernorm = RMSNorm(a.arch.hidden, a.rms_norm_eps)
        self.mlp = MoE(a) if a.arch.is_moe(layer) else SwiGLU(a.arch.hidden, a.arch.inter)

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.norm = RMSNorm(a.arch.hidden, a.rms_norm_eps)
        self.head = Linear(a.arch.hidden, a.arch.vocab)


class MTPBlock(Block):
    """Multi-token-prediction block (published as ``model.layers.{n_layers}``): loaded and kept, not run by
    ``forward`` (DeepSeek's inference code does not run it either)."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.embed_tokens = nn.Embedding(a.arch.vocab, a.arch.hidden)
        self.enorm = RMSNorm(a.arch.hidden, a.rms_norm_eps)
        self.hnorm = RMSNorm(a.arch.hidden, a.rms_norm_eps)
        self.eh_proj = Linear(2 * a.arch.hidden, a.arch.hidden)
        self.shared_head = SharedHead(a)


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs, n_mtp: int) -> None:
        super().__init__()
        ar = a.arch
        self.embed_tokens = nn.Embedding(ar.vocab, ar.hidden)
        blocks: list[nn.Module] = [Block(a, L) for L in range(ar.n_layers)]
        blocks += [MTPBlock(a, L) for L in range(ar.n_layers, ar.n_layers + n_mtp)]
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(ar.hidden, a.rms_norm_eps)


class DeepseekV3(nn.Module):
    """``model(input_ids [B,T], start_pos) -> float32 logits [B,T,V]`` with static caches."""

    def __init__(self, a: ModelArgs, n_mtp: int) -> None:
        super().__init__()
        self.args = a
        self.family = a.family
        self.model = Backbone(a, n_mtp)
        self.lm_head = Linear(a.arch.hidden, a.arch.vocab)
        self.max_seq_len = 0
        self.max_batch_size = 0

    @property
    def n_mtp(self) -> int:
        return len(self.model.layers) - self.args.arch.n_layers

    def allocate(self, max_batch: int, max_seq_len: int, device, dtype: torch.dtype) -> None:
        """(Re)allocate KV caches and RoPE tables for ``max_batch`` x ``max_seq_len`` positions."""
        ar = self.args.arch
        inv, att = rope_inv_freq(ar.rope, self.args.rope_theta, self.args.yarn)
        ang = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv[None, :]   # [S, rope/2]
        self.register_buffer("rope_cos", (ang.cos() * att).to(device), persistent=False)
        self.register_buffer("rope_sin", (ang.sin() * att).to(device), persistent=False)
        for L in range(ar.n_layers):
            attn = self.model.layers[L].self_attn
            attn.caches = Caches({"kv": ar.kv_lora, "pe": ar.rope}, max_batch, max_seq_len, device, dtype)
            if attn.indexer is not None:
                attn.indexer.caches = Caches({"k": ar.index_dim}, max_batch, max_seq_len, device, dtype)
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch

    def set_dynamic_routing(self, dynamic: DynamicRouting | None) -> None:
        """Opt-in variable experts per token (``None`` restores the model's exact top-k)."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.dynamic = dynamic

    def routing_stats(self) -> dict[str, float]:
        """Mean routed experts per token over MoE layer calls since the last reset."""
        moes = [m for m in self.model.layers[: self.args.arch.n_layers].modules() if isinstance(m, MoE)]
        toks = sum(m.tokens_seen for m in moes)
        used = sum(m.experts_used for m in moes)
        return {"experts_per_token": used / toks if toks else 0.0, "token_layer_calls": float(toks)}

    def reset_routing_stats(self) -> None:
        for m in self.modules():
            if isinstance(m, MoE):
                m.tokens_seen = m.experts_used = 0

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T = input_ids.shape
        end = start_pos + T
        if end > self.max_seq_len or B > self.max_batch_size:
            raise SequenceTooLong(f"positions {start_pos}..{end - 1} x batch {B} exceed the cache "
                                  f"({self.max_seq_len} positions x batch {self.max_batch_size})")
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        mask = torch.full((T, end), float("-inf"), device=h.device).triu_(start_pos + 1)   # [T,S] additive
        for layer in self.model.layers[: self.args.arch.n_layers]:
            h = layer(h, start_pos, cos, sin, mask)
        return self.lm_head(self.model.norm(h)).float()


# Parameters kept in float32 whatever the model dtype (transformers: ``_keep_in_fp32_modules(_strict)``).
FLOAT32_PARAMS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")


def _mtp_blocks_present(ck, n_layers: int) -> int:
    """Number of MTP blocks whose tensors the checkpoint holds (transformers' save_pretrained drops them)."""
    layers = {info.layer for info in ck.infos() if info.mtp}
    return len(layers)


def build(ck, device, dtype: torch.dtype, max_seq_len: int, opts: LoadOptions = LoadOptions()) -> DeepseekV3:
    """Family builder for ``deepseek_v3`` / ``deepseek_v32``: meta-device model, tensors assigned one by one."""
    a = ModelArgs.from_config(ck.config, str(Path(ck.root) / "config.json"))
    n_mtp = _mtp_blocks_present(ck, a.arch.n_layers)
    with torch.device("meta"):
        model = DeepseekV3(a, n_mtp)
    if opts.shard is not None:      # distributed: this rank's part only (runtime/distributed.py)
        opts.shard(model)
    fill_from_checkpoint(model, ck, lambda n: n, dtype, device, keep_dtype=FLOAT32_PARAMS, fake_quant=opts.fake_quant,
                         packed=opts.packed, act_quant=opts.act_quant)
    if max_seq_len < 1:
        raise RuntimeLoadError(f"max_seq_len must be >= 1, got {max_seq_len}")
    model.allocate(opts.max_batch_size, max_seq_len, device, dtype)
    model.set_dynamic_routing(opts.dynamic_routing)
    return model.eval()
