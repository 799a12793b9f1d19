"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed entries (CSA / HCA), with sinks.

Semantics follow transformers 5.24 ``models/deepseek_v4/modeling_deepseek_v4.py`` (``DeepseekV4Attention``,
``DeepseekV4CSACompressor``, ``DeepseekV4HCACompressor``, ``DeepseekV4Indexer``); caches are preallocated
in V4's true shape instead of transformers' growing lists:

- window ring ``[B, window, head_dim]`` (one shared K=V head), slot ``pos % window``;
- compressed entries ``[B, max_seq_len // ratio, head_dim]`` (entry ``w`` summarises positions
  ``w*ratio .. w*ratio+ratio-1``; CSA entries also see the previous window through the overlap series);
- CSA indexer entries ``[B, max_seq_len // ratio, index_head_dim]``;
- compressor state: raw projections of the current incomplete window ``[B, ratio, coff*head_dim]`` and, for
  the overlapping (CSA) series, the previous window's first half ``[B, ratio, head_dim]``.

Shapes: activations ``[B, T, D]``; ``H`` heads of ``Dh = head_dim``; ``rd`` = rotated (trailing) channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import FakeQuant, Linear, RMSNorm, RopeStyle, apply_rope, fake_quant_fp8_act
from .v4_args import AttnKind, V4Args


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS norm over the last dim (transformers ``DeepseekV4UnweightedRMSNorm``)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing ``2 * cos.shape[-1]`` channels of ``x [..., T, (H,) D]``; the leading
    (nope) channels pass through. ``cos, sin [T, rd/2]``. Rotation in float32, result in ``x.dtype``."""
    rd = 2 * cos.shape[-1]
    # cos/sin rounded to x's dtype first, then the rotation in float32 (transformers' order)
    cos, sin = cos.to(x.dtype).float(), sin.to(x.dtype).float()
    rot = apply_rope(x[..., -rd:].float(), cos, sin, RopeStyle.INTERLEAVED).to(x.dtype)
    return torch.cat([x[..., :-rd], rot], dim=-1)


KV_QUANT_BLOCK = 64   # DeepSeek V4 ``act_quant(kv[..., :-rd], 64, ...)`` on cached KV entries


def kv_fake_quant(kv: torch.Tensor, rd: int, mode: FakeQuant) -> torch.Tensor:
    """Opt-in DeepSeek KV-cache simulation: FP8 e4m3 quantize-dequantize of the non-rope channels of
    ``kv [..., Dh]`` per 64-block (rope channels stay exact); ``FakeQuant.NONE`` returns ``kv`` unchanged."""
    if mode is FakeQuant.NONE:
        return kv
    nope = fake_quant_fp8_act(kv[..., :-rd], pow2_scale=mode is FakeQuant.FP8_BLOCK_UE8M0, block=KV_QUANT_BLOCK)
    return torch.cat([nope, kv[..., -rd:]], dim=-1)


class RopeTables:
    """cos/sin ``[max_seq_len, rd/2]`` (float32) of the two V4 rope types, indexed by absolute position."""

    def __init__(self, main: tuple[torch.Tensor, torch.Tensor], compress: tuple[torch.Tensor, torch.Tensor]):
        self.main, self.compress = main, compress

    def get(self, compressed: bool, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.compress if compressed else self.main
        return cos[positions], sin[positions]


class Compressor(nn.Module):
    """Gated softmax pooling of ``ratio`` tokens into one entry (``overlap``: CSA's two series, width 2*ratio).

    Published names: ``ape [ratio, coff*d]`` (position bias of the gate), ``wkv``/``wgate [coff*d, dim]``,
    ``norm [d]``. ``coff = 2`` with overlap: channels ``[:d]`` (series Ca) feed the *next* window's entry,
    ``[d:]`` (Cb) the current one. Entry ``w`` gets RoPE ("compress" rope) at position ``w * ratio``.
    """

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        c = 2 if overlap else 1
        self.ape = nn.Parameter(torch.empty(ratio, c * head_dim), requires_grad=False)
        self.wkv = Linear(dim, c * head_dim)
        self.wgate = Linear(dim, c * head_dim)
        self.norm = RMSNorm(head_dim, eps)
        self.kv_quant = FakeQuant.NONE        # opt-in FP8 simulation of the entries (main compressor only)

    def allocate(self, batch: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        d, r, c = self.head_dim, self.ratio, (2 if self.overlap else 1)
        z = dict(dtype=dtype, device=device)
        self.register_buffer("entries", torch.zeros(batch, max_seq_len // r, d, **z), persistent=False)
        self.register_buffer("buf_kv", torch.zeros(batch, r, c * d, **z), persistent=False)
        # gate logits are kept in float32 (``ape`` is float32, as in transformers' promoted sum)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("buf_gate", torch.zeros(batch, r, c * d, **f32), persistent=False)
        if self.overlap:
            self.register_buffer("prev_kv", torch.zeros(batch, r, d, **z), persistent=False)
            self.register_buffer("prev_gate", torch.zeros(batch, r, d, **f32), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, rope: RopeTables) -> int:
        """Consume tokens ``start_pos .. start_pos+T-1`` of ``x [B, T, dim]``; write every window they complete
        into ``entries``; return the number of valid entries, ``(start_pos + T) // ratio``."""
        B, T, _ = x.shape
        r, d = self.ratio, self.head_dim
        kv, gate = self.wkv(x), self.wgate(x)                        # [B, T, coff*d]
        off = start_pos % r
        first = start_pos - off                                      # position of the first buffered token
        if off:
            kv = torch.cat([self.buf_kv[:B, :off].to(kv.dtype), kv], dim=1)
            gate = torch.cat([self.buf_gate[:B, :off].to(gate.dtype), gate], dim=1)
        n = kv.shape[1] // r                                         # windows completed by this call
        used = n * r
        if n:
            ck = kv[:, :used].view(B, n, r, -1)
            cg = gate[:, :used].view(B, n, r, -1) + self.ape         # [B, n, r, coff*d]
            if self.overlap:
                # slots [0, r): previous window's Ca (zero kv / -inf gate before the first window), [r, 2r): Cb
                nk = ck.new_zeros(B, n, 2 * r, d)
                ng = cg.new_full((B, n, 2 * r, d), float("-inf"))
                nk[:, :, r:] = ck[..., d:]
                ng[:, :, r:] = cg[..., d:]
                if n > 1:
                    nk[:, 1:, :r] = ck[:, :-1, :, :d]
                    ng[:, 1:, :r] = cg[:, :-1, :, :d]
                if first > 0:
                    nk[:, 0, :r] = self.prev_kv[:B].to(nk.dtype)
                    ng[:, 0, :r] = self.prev_gate[:B].to(ng.dtype)
                self.prev_kv[:B] = ck[:, -1, :, :d]
                self.prev_gate[:B] = cg[:, -1, :, :d]
                ck, cg = nk, ng
            pooled = (ck * cg.softmax(dim=2, dtype=torch.float32).to(ck.dtype)).sum(dim=2)   # [B, n, d]
            comp = self.norm(pooled)
            pos = first + torch.arange(n, device=x.device) * r
            cos, sin = rope.get(True, pos)
            e0 = first // r
            comp = kv_fake_quant(rope_tail(comp, cos, sin), 2 * cos.shape[-1], self.kv_quant)
            self.entries[:B, e0:e0 + n] = comp.to(self.entries.dtype)
        rest = kv.shape[1] - used
        if rest:
            self.buf_kv[:B, :rest] = kv[:, used:]
            self.buf_gate[:B, :rest] = gate[:, used:]
        return (start_pos + T) // r


class Indexer(nn.Module):
    """Lightning indexer of CSA: per query, the top-``index_topk`` causal compressed entries by
    ``sum_h w_h * relu(q_h . k) * index_head_dim**-0.5`` with ``w = weights_proj(x) * n_heads**-0.5``."""

    def __init__(self, a: V4Args, ratio: int) -> None:
        super().__init__()
        arch = a.arch
        self.n_heads, self.head_dim, self.ratio, self.topk = arch.index_heads, arch.index_dim, ratio, a.index_topk
        self.wq_b = Linear(arch.q_lora, arch.index_heads * arch.index_dim)
        self.weights_proj = Linear(arch.hidden, arch.index_heads)
        self.compressor = Compressor(arch.hidden, arch.index_dim, ratio, True, a.rms_norm_eps)
        self.stable_ties = False      # opt-in: resolve exact score ties to the lowest entry (ONNX TopK's rule)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, positions: torch.Tensor,
                rope: RopeTables) -> torch.Tensor:
        """Bool ``[B, T, n_entries]``: compressed entries each query attends to."""
        B, T, _ = x.shape
        n_c = self.compressor(x, start_pos, rope)
        keys = self.compressor.entries[:B, :n_c]                     # [B, n_c, Di]
        if n_c == 0:
            return torch.zeros(B, T, 0, dtype=torch.bool, device=x.device)
        cos, sin = rope.get(True, positions)
        q = rope_tail(self.wq_b(qr).view(B, T, self.n_heads, self.head_dim), cos, sin)
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))       # [B, T, Hi, n_c]
        scores = F.relu(scores) * self.head_dim ** -0.5
        w = self.weights_proj(x).float() * self.n_heads ** -0.5                               # [B, T, Hi]
        score = (scores * w.unsqueeze(-1)).sum(dim=2)                                         # [B, T, n_c]
        limit = (positions + 1) // self.ratio                        # entries < limit are complete for the query
        ent = torch.arange(n_c, device=x.device)
        score = score.masked_fill(ent[None, None, :] >= limit[None, :, None], float("-inf"))
        k = min(self.topk, n_c)
        if self.stable_ties:    # exact ties (ReLU zeroes every head) -> lowest entry, as ONNX TopK (DEVIATIONS.md)
            top = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]               # [B, T, k]
        else:                   # torch.topk, as transformers (tie order unspecified)
            top = score.topk(k, dim=-1).indices
        valid = top < limit[None, :, None]
        return torch.zeros(B, T, n_c, dtype=torch.bool, device=x.device).scatter_(-1, top, valid)


class Attention(nn.Module):
    """V4 attention block. Published names: ``wq_a, q_norm, wq_b, wkv, norm, wo_a, wo_b, attn_sink``,
    ``compressor.*`` (CSA/HCA), ``indexer.*`` (CSA)."""

    def __init__(self, a: V4Args, block: int) -> None:
        super().__init__()
        arch = a.arch
        self.kind, self.ratio = a.kinds[block], a.ratios[block]
        self.n_heads, self.head_dim, self.window = arch.n_heads, arch.head_dim, a.window
        self.o_groups, self.o_lora, self.eps = arch.o_groups, arch.o_lora, a.rms_norm_eps
        self.wq_a = Linear(arch.hidden, arch.q_lora)
        self.q_norm = RMSNorm(arch.q_lora, a.rms_norm_eps)
        self.wq_b = Linear(arch.q_lora, arch.n_heads * arch.head_dim)
        self.wkv = Linear(arch.hidden, arch.head_dim)
        self.norm = RMSNorm(arch.head_dim, a.rms_norm_eps)
        self.wo_a = Linear(arch.n_heads * arch.head_dim // arch.o_groups, arch.o_groups * arch.o_lora)
        self.wo_b = Linear(arch.o_groups * arch.o_lora, arch.hidden)
        self.attn_sink = nn.Parameter(torch.empty(arch.n_heads), requires_grad=False)
        self.compressor = (Compressor(arch.hidden, arch.head_dim, self.ratio, self.kind is AttnKind.CSA,
                                      a.rms_norm_eps) if self.kind is not AttnKind.SLIDING else None)
        self.indexer = Indexer(a, self.ratio) if self.kind is AttnKind.CSA else None
        self.rope_dim = a.rope_dim
        self.kv_quant = FakeQuant.NONE        # opt-in FP8 simulation of the window KV (DeepSeek QAT)

    def set_kv_quant(self, mode: FakeQuant) -> None:
        """Opt-in DeepSeek KV simulation on the window KV and the compressed entries (not the indexer's)."""
        self.kv_quant = mode
        if self.compressor is not None:
            self.compressor.kv_quant = mode

    def allocate(self, batch: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.register_buffer("win_kv", torch.zeros(batch, self.window, self.head_dim, dtype=dtype, device=device),
                             persistent=False)
        for m in (self.compressor, self.indexer and self.indexer.compressor):
            if m is not None:
                m.allocate(batch, max_seq_len, dtype, device)

    def forward(self, x: torch.Tensor, start_pos: int, rope: RopeTables) -> torch.Tensor:
        B, T, _ = x.shape
        H, Dh, W = self.n_heads, self.head_dim, self.window
        dev = x.device
        pos = torch.arange(start_pos, start_pos + T, device=dev)
        cos, sin = rope.get(self.kind is not AttnKind.SLIDING, pos)
        qr = self.q_norm(self.wq_a(x))                                               # [B, T, q_lora]
        q = rope_tail(unit_rms(self.wq_b(qr).view(B, T, H, Dh), self.eps), cos, sin)  # [B, T, H, Dh]
        kv = rope_tail(self.norm(self.wkv(x)), cos, sin)                             # [B, T, Dh]
        kv = kv_fake_quant(kv, self.rope_dim, self.kv_quant)

        # sliding window: earlier positions still in the ring, then this call's tokens
        n_old = min(start_pos, W - 1)
        old_pos = torch.arange(start_pos - n_old, start_pos, device=dev)
        keys = torch.cat([self.win_kv[:B, old_pos % W].to(kv.dtype), kv], dim=1)     # [B, Lw, Dh]
        kpos = torch.cat([old_pos, pos])
        allow = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - W)  # [T, Lw]
        allow = allow.unsqueeze(0).expand(B, T, -1)
        keep = min(T, W)
        self.win_kv[:B, pos[-keep:] % W] = kv[:, -keep:].to(self.win_kv.dtype)

        if self.compressor is not None:
            n_c = self.compressor(x, start_pos, rope)
            if self.indexer is not None:
                sel = self.indexer(x, qr, start_pos, pos, rope)                     # [B, T, n_c]
            else:
                limit = (pos + 1) // self.ratio
                sel = (torch.arange(n_c, device=dev)[None, :] < limit[:, None]).unsqueeze(0).expand(B, T, n_c)
            keys = torch.cat([keys, self.compressor.entries[:B, :n_c].to(kv.dtype)], dim=1)
            allow = torch.cat([allow, sel], dim=-1)

        scores = torch.matmul(q.transpose(1, 2), keys.unsqueeze(1).transpose(-1, -2)) * Dh ** -0.5  # [B,H,T,L]
        scores = scores.masked_fill(~allow.unsqueeze(1), float("-inf"))
        # float32 softmax over [scores, sink] (transformers: the float32 sink promotes the concatenation)
        sink = self.attn_sink.float().view(1, H, 1, 1).expand(B, H, T, 1)
        logits = torch.cat([scores.float(), sink], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        out = torch.matmul(probs.to(keys.dtype), keys.unsqueeze(1)).transpose(1, 2)      # [B, T, H, Dh]
        out = rope_tail(out, cos, -sin)                             # undo the values' rotation at the query position

        # grouped output projection: group g of heads -> o_lora channels with wo_a[g], then wo_b
        G = self.o_groups
        wa = self.wo_a.dense_weight().view(G, self.o_lora, -1)                           # [G, o_lora, H*Dh/G]
        grouped = torch.einsum("btgi,goi->btgo", out.reshape(B, T, G, -1), wa.to(out.dtype))
        return self.wo_b(grouped.flatten(2))
