"""DeepSeek V3 / R1 / V3.1 (``deepseek_v3``) and V3.2 (``deepseek_v32``) as an onnxruntime graph.

Per decoder block (shapes: B batch, T new tokens, P past tokens, S = P + T, H heads, D hidden):

* MLA, absorbed (DeepSeek ``inference/model.py`` ``attn_impl="absorb"``; our ``runtime.deepseek_v3.MLA``): the cache
  is one latent KV head per token, ``past_key_values.L.key [B, 1, P, kv_lora + rope]`` = ``kv_a_layernorm(c_kv) |
  rope(k_pe)``; ``present.L.key [B, 1, S, kv_lora + rope]``. ``kv_b_proj`` is split into ``W_uk [H, nope, kv_lora]``
  (folded into q) and ``W_uv^T [H, kv_lora, v]`` (applied after attention), kept float32 (like llama.cpp's rule that
  ``attn_k_b/attn_v_b`` never go below Q8_0). Scores ``[q_abs | q_pe] . latent^T * softmax_scale`` (YaRN mscale^2),
  causal mask from ``position_ids`` and ``attention_mask``, all from standard ops (MatMul/Softmax).
* RoPE: ``cos/sin [B, T, rope/2]`` from ``position_ids`` x the YaRN inverse frequencies and attention factor that
  ``runtime.common.rope_inv_freq`` computes (transformers ``_compute_yarn_parameters``); pairs interleaved
  ``(2i, 2i+1)`` as in DeepSeek's code (or half-split when the config says ``rope_interleave: false``).
* Routed experts: ``com.microsoft.QMoE`` (int4 blocks, ``swiglu_fusion=1`` gate/up interleaved rows, alpha 1, beta 0 =
  exact SiLU-GLU), ``router_probs`` = biased sigmoid scores with non-kept groups at -inf (group-limited selection,
  ``n_group``/``topk_group``), ``router_weights`` = unbiased sigmoid scores / (sum over the chosen top-k + 1e-20) x
  ``routed_scaling_factor`` (QMoE gathers them at its chosen experts; honoured by the CPU kernel only).
  In FP32 mode (no float QMoE takes ``router_weights``) the routed experts are composed from batched MatMuls over
  all experts, weighted by a dense ``[N, E]`` weight tensor (zero off the top-k): exact, O(E) compute, meant as
  a reference export.
* V3.2: the lightning indexer picks ``index_topk`` keys per query (``V3Graph.indexer``), composed from MatMul,
  Relu, LayerNormalization, TopK and ScatterElements; its keys are a second cache ``past_key_values.L.indexer_key``.
* Linears (q_a, q_b, kv_a, o, dense MLP, shared expert): ``com.microsoft.MatMulNBits`` 4-bit, or MatMul on FP32.
  Router, embedding and head stay float32. The MTP block is not part of the graph (nothing runs it).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnx import TensorProto, helper

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Family, Role
from v4convert.runtime.args import ModelArgs
from v4convert.runtime.common import rope_inv_freq, yarn_softmax_scale

from .graph import ExternalData, Graph
from .quant import quantize_int4

MS = "com.microsoft"
NEG_INF = float("-inf")


# Roles stored as 4-bit blocks in an int4 export (everything else: FP32). One table: the graph builder and
# ``export.onnx.int4_reference_weights`` (what tests compare against) both read it.
INT4_ROLES = frozenset({Role.ATTN_Q_A, Role.ATTN_Q_B, Role.ATTN_KV_A, Role.ATTN_O,
                        Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN,
                        Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN,
                        Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN})


def latent_width(a: ModelArgs) -> int:
    """Width of the one latent KV head cached per token: ``kv_lora + rope`` (576 for the 671B model)."""
    return a.arch.kv_lora + a.arch.rope


class V3Graph:
    """Builds the graph while streaming weights; ``int4`` selects MatMulNBits/QMoE, else FP32 everywhere."""

    def __init__(self, ck: Checkpoint, data: ExternalData, int4: bool, block: int, accuracy_level: int,
                 tick: Callable[[str], None]) -> None:
        self.ck, self.data, self.int4, self.block, self.acc = ck, data, int4, block, accuracy_level
        self.a = self.parse_args(ck)
        self.g = Graph()
        self.tick = tick
        self.bytes_read = 0

    @staticmethod
    def parse_args(ck: Checkpoint):
        return ModelArgs.from_config(ck.config, str(ck.root / "config.json"))

    # ------------------------------------------------------------------ weights
    def _load(self, name: str) -> torch.Tensor:
        w = self.ck.dequantize(name)
        self.bytes_read += self.ck.tensor_info(name).nbytes
        self.ck.release(name)
        self.tick(name)
        return w

    def _f32(self, name: str, t: torch.Tensor) -> str:
        return self.g.init(self.data.add(name, t.to(torch.float32).contiguous()))

    int4_roles = INT4_ROLES

    def linear(self, x: str, name: str) -> str:
        """``x [..., K] @ W^T`` for checkpoint weight ``name [N, K]``."""
        w = self._load(name)
        N, K = w.shape
        if not self.int4 or self.ck.tensor_info(name).role not in self.int4_roles:
            return self.g.op1("MatMul", [x, self._f32(name + ".T", w.T)])
        q = quantize_int4(w, self.block)
        codes = self.g.init(self.data.add(name + ".qweight", q.codes))
        scales = self.g.init(self.data.add(name + ".scales", q.scales.reshape(-1)))
        return self.g.op1("MatMulNBits", [x, codes, scales], domain=MS, K=K, N=N, bits=4, block_size=self.block,
                          accuracy_level=self.acc)

    # ------------------------------------------------------------------ small pieces
    def rms(self, x: str, name: str, eps: float) -> str:
        """``w * x * rsqrt(mean(x^2) + eps)`` over the last dim (``runtime.common.RMSNorm``)."""
        g = self.g
        ms = g.op1("ReduceMean", [g.op1("Mul", [x, x]), g.const([-1])], keepdims=1)
        r = g.op1("Reciprocal", [g.op1("Sqrt", [g.op1("Add", [ms, g.const(eps, np.float32)])])])
        return g.op1("Mul", [self._f32(name, self._load(name)), g.op1("Mul", [x, r])])

    def rope_width(self) -> int:
        return self.a.arch.rope

    def rope(self, x: str, cos: str, sin: str, rank: int, interleaved: bool | None = None) -> str:
        """Rotate ``x [..., rope]`` (rank ``rank``) by ``cos/sin`` broadcastable to ``[..., rope/2]``; pairs
        ``(2i, 2i+1)`` when ``interleaved`` (default: the config's main-attention style), else ``(i, i + rope/2)``."""
        g = self.g
        interleaved = self.a.rope_interleave if interleaved is None else interleaved
        if interleaved:
            width = self.rope_width()
            pairs = g.op1("Reshape", [x, g.const([0] * (rank - 1) + [width // 2, 2])])   # [..., rope/2, 2]
            a, b = g.op("Split", [pairs, g.const([1, 1])], n_out=2, axis=-1)
            c, s = (g.op1("Unsqueeze", [t, g.const([-1])]) for t in (cos, sin))
        else:
            half = self.rope_width() // 2
            a, b = g.op("Split", [x, g.const([half, half])], n_out=2, axis=-1)
            c, s = cos, sin
        ra = g.op1("Sub", [g.op1("Mul", [a, c]), g.op1("Mul", [b, s])])
        rb = g.op1("Add", [g.op1("Mul", [b, c]), g.op1("Mul", [a, s])])
        out = g.op1("Concat", [ra, rb], axis=-1)
        if interleaved:
            out = g.op1("Reshape", [out, g.const([0] * (rank - 1) + [width])])     # no -1: rows may be 0
        return out

    def clamp(self, gate: str, up: str, limit: float | None) -> tuple[str, str]:
        """V4 SwiGLU clamp: ``gate <= limit``, ``-limit <= up <= limit`` (``None`` or <= 0: unchanged)."""
        if limit is None or limit <= 0:
            return gate, up
        g, lim = self.g, float(limit)
        return (g.op1("Clip", [gate, "", g.const(lim, np.float32)]),
                g.op1("Clip", [up, g.const(-lim, np.float32), g.const(lim, np.float32)]))

    def swiglu(self, x: str, prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
               limit: float | None = None) -> str:
        """``down(silu(gate(x)) * up(x))`` for ``prefix.{gate,up,down}.weight`` (``names``), clamped by ``limit``."""
        g = self.g
        gt, up = self.clamp(self.linear(x, f"{prefix}.{names[0]}.weight"), self.linear(x, f"{prefix}.{names[1]}.weight"),
                            limit)
        h = g.op1("Mul", [g.op1("Mul", [gt, g.op1("Sigmoid", [gt])]), up])
        return self.linear(h, f"{prefix}.{names[2]}.weight")

    # ------------------------------------------------------------------ blocks
    def attention(self, x: str, L: int, cos: str, sin: str, mask: str, causal: str) -> str:
        g, ar = self.g, self.a.arch
        H, nope, rope, v, kvl = ar.n_heads, ar.nope, ar.rope, ar.v_head, ar.kv_lora
        p = f"model.layers.{L}.self_attn"
        qr = self.rms(self.linear(x, f"{p}.q_a_proj.weight"), f"{p}.q_a_layernorm.weight", 1e-6)
        q = g.op1("Reshape", [self.linear(qr, f"{p}.q_b_proj.weight"), g.const([0, 0, H, nope + rope])])
        q_nope, q_pe = g.op("Split", [q, g.const([nope, rope])], n_out=2, axis=-1)
        cos4, sin4 = (g.op1("Unsqueeze", [t, g.const([2])]) for t in (cos, sin))
        q_pe = self.rope(q_pe, cos4, sin4, rank=4)
        c, k_pe = g.op("Split", [self.linear(x, f"{p}.kv_a_proj_with_mqa.weight"), g.const([kvl, rope])],
                       n_out=2, axis=-1)
        c = self.rms(c, f"{p}.kv_a_layernorm.weight", 1e-6)
        new = g.op1("Unsqueeze", [g.op1("Concat", [c, self.rope(k_pe, cos, sin, rank=3)], axis=-1), g.const([1])])
        present = g.op1("Concat", [f"past_key_values.{L}.key", new], axis=2, outputs=[f"present.{L}.key"])
        wkv = self._load(f"{p}.kv_b_proj.weight").view(H, nope + v, kvl)
        w_uk = self._f32(f"{p}.kv_b_proj.w_uk", wkv[:, :nope])                    # [H, nope, kv_lora]
        w_uv = self._f32(f"{p}.kv_b_proj.w_uv_t", wkv[:, nope:].transpose(1, 2))  # [H, kv_lora, v]
        q_abs = g.op1("MatMul", [g.op1("Transpose", [q_nope], perm=[0, 2, 1, 3]), w_uk])     # [B,H,T,kv_lora]
        qf = g.op1("Concat", [q_abs, g.op1("Transpose", [q_pe], perm=[0, 2, 1, 3])], axis=-1)   # [B,H,T,kvl+rope]
        scores = g.op1("MatMul", [qf, g.op1("Transpose", [present], perm=[0, 1, 3, 2])])      # [B,H,T,S]
        scale = yarn_softmax_scale(nope + rope, self.a.yarn)
        scores = g.op1("Add", [g.op1("Mul", [scores, g.const(scale, np.float32)]), mask])
        if self.a.family is Family.V32:
            scores = g.op1("Add", [scores, self.indexer(x, qr, L, cos, sin, causal)])
        prob = g.op1("Softmax", [scores], axis=-1)
        kv_c = g.op1("Slice", [present, g.const([0]), g.const([kvl]), g.const([3])])          # [B,1,S,kv_lora]
        o = g.op1("MatMul", [g.op1("MatMul", [prob, kv_c]), w_uv])                              # [B,H,T,v]
        o = g.op1("Reshape", [g.op1("Transpose", [o], perm=[0, 2, 1, 3]), g.const([0, 0, H * v])])
        return self.linear(o, f"{p}.o_proj.weight")

    def indexer(self, x: str, qr: str, L: int, cos: str, sin: str, causal: str) -> str:
        """V3.2 lightning indexer (``runtime.deepseek_v3.Indexer``) -> additive sparse mask ``[B, 1, T, S]``.

        ``index[b,s,t] = sum_h w[b,s,h] Hi^-0.5 relu(Di^-0.5 q[b,s,h] . k[b,t]) + causal``; the ``min(index_topk, S)``
        best keys per query stay (ONNX ``TopK`` breaks ties towards the lower index, like the runtime's stable
        sort), the rest get -inf. Keys cached in ``past_key_values.L.indexer_key [B, 1, P, Di]``. The indexer's
        weights stay FP32 in every export (a near-tie flip in a 4-bit top-k selection changes which keys exist).
        """
        g, ar = self.g, self.a.arch
        Hi, Di, rope = ar.index_heads, ar.index_dim, ar.rope
        p = f"model.layers.{L}.self_attn.indexer"
        cos4, sin4 = (g.op1("Unsqueeze", [t, g.const([2])]) for t in (cos, sin))

        def part_rope(t: str, c: str, s_: str, rank: int) -> str:
            head, tail = g.op("Split", [t, g.const([rope, Di - rope])], n_out=2, axis=-1)
            return g.op1("Concat", [self.rope(head, c, s_, rank, interleaved=False), tail], axis=-1)

        q = g.op1("Reshape", [self.dense_linear(qr, f"{p}.wq_b.weight"), g.const([0, 0, Hi, Di])])
        q = part_rope(q, cos4, sin4, 4)                                                          # [B,T,Hi,Di]
        k = g.op1("LayerNormalization", [self.dense_linear(x, f"{p}.wk.weight"),
                                         self._f32(f"{p}.k_norm.weight", self._load(f"{p}.k_norm.weight")),
                                         self._f32(f"{p}.k_norm.bias", self._load(f"{p}.k_norm.bias"))],
                  axis=-1, epsilon=1e-6)
        k = g.op1("Unsqueeze", [part_rope(k, cos, sin, 3), g.const([1])])                           # [B,1,T,Di]
        keys = g.op1("Concat", [f"past_key_values.{L}.indexer_key", k], axis=2, outputs=[f"present.{L}.indexer_key"])
        qt = g.op1("Transpose", [q], perm=[0, 2, 1, 3])                                            # [B,Hi,T,Di]
        sc = g.op1("MatMul", [qt, g.op1("Transpose", [keys], perm=[0, 1, 3, 2])])                 # [B,Hi,T,S]
        sc = g.op1("Relu", [g.op1("Mul", [sc, g.const(Di ** -0.5, np.float32)])])
        w = g.op1("Mul", [self.dense_linear(x, f"{p}.weights_proj.weight"), g.const(Hi ** -0.5, np.float32)])
        w = g.op1("Unsqueeze", [g.op1("Transpose", [w], perm=[0, 2, 1]), g.const([-1])])          # [B,Hi,T,1]
        index = g.op1("Add", [g.op1("ReduceSum", [g.op1("Mul", [sc, w]), g.const([1])], keepdims=0), causal])
        S = g.op1("Shape", [index], start=-1)
        kk = g.op1("Min", [S, g.const([self.a.index_topk])])
        top = g.op("TopK", [index, kk], n_out=2, axis=-1, largest=1, sorted=1)[1]                  # [B,T,k]
        zero = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
        ninf = helper.make_tensor("n", TensorProto.FLOAT, [1], [NEG_INF])
        full = g.op1("ConstantOfShape", [g.op1("Shape", [index])], value=ninf)
        sparse = g.op1("ScatterElements", [full, top, g.op1("ConstantOfShape", [g.op1("Shape", [top])], value=zero)],
                       axis=-1)
        return g.op1("Unsqueeze", [sparse, g.const([1])])

    def dense_linear(self, x: str, name: str) -> str:
        """``x @ W^T`` with ``W`` kept FP32 whatever the export's weight type."""
        return self.g.op1("MatMul", [x, self._f32(name + ".T", self._load(name).T)])

    def router(self, flat: str, p: str) -> tuple[str, str, str]:
        """``(router_probs, router_weights, chosen [N, k])``: DeepSeek noaux_tc group-limited routing."""
        g, r = self.g, self.a.router
        E = r.n_experts
        logits = g.op1("MatMul", [flat, self._f32(f"{p}.gate.weight.T", self._load(f"{p}.gate.weight").T)])
        scores = g.op1("Sigmoid", [logits])                                                  # [N, E]
        choice = g.op1("Add", [scores, self._f32(f"{p}.gate.e_score_correction_bias",
                                                 self._load(f"{p}.gate.e_score_correction_bias"))])
        if r.n_group > 1:
            grouped = g.op1("Reshape", [choice, g.const([-1, r.n_group, E // r.n_group])])
            top2 = g.op("TopK", [grouped, g.const([2])], n_out=2, axis=-1)[0]
            gscore = g.op1("ReduceSum", [top2, g.const([-1])], keepdims=0)                     # [N, G]
            keep = g.op("TopK", [gscore, g.const([r.topk_group])], n_out=2, axis=-1)[1]          # [N, topk_group]
            zero = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
            one = helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0])
            gm = g.op1("ScatterElements", [g.op1("ConstantOfShape", [g.op1("Shape", [gscore])], value=zero), keep,
                                           g.op1("ConstantOfShape", [g.op1("Shape", [keep])], value=one)], axis=1)
            em = g.op1("Expand", [g.op1("Unsqueeze", [gm, g.const([-1])]), g.const([1, 1, E // r.n_group])])
            em = g.op1("Cast", [g.op1("Reshape", [em, g.const([-1, E])])], to=TensorProto.BOOL)
            choice = g.op1("Where", [em, choice, g.const(NEG_INF, np.float32)])
        chosen = g.op("TopK", [choice, g.const([r.top_k])], n_out=2, axis=-1)[1]                # [N, k]
        if r.norm_topk_prob:
            picked = g.op1("GatherElements", [scores, chosen], axis=1)
            denom = g.op1("Add", [g.op1("ReduceSum", [picked, g.const([-1])], keepdims=1), g.const(1e-20, np.float32)])
            weights = g.op1("Div", [scores, denom])
        else:
            weights = scores
        weights = g.op1("Mul", [weights, g.const(r.routed_scaling_factor, np.float32)])
        return choice, weights, chosen

    def moe(self, x: str, L: int) -> str:
        g, ar = self.g, self.a.arch
        p = f"model.layers.{L}.mlp"
        flat = g.op1("Reshape", [x, g.const([-1, ar.hidden])])
        probs, weights, chosen = self.router(flat, p)

        def names(e: int) -> tuple[str, str, str]:         # expert e's gate, up, down tensor names
            return tuple(f"{p}.experts.{e}.{n}_proj.weight" for n in ("gate", "up", "down"))

        if self.int4:
            routed = self.qmoe(flat, probs, weights, p, names)
        else:
            routed = self.dense_experts(flat, weights, chosen, p, names)
        shared = self.swiglu(flat, f"{p}.shared_experts")
        out = g.op1("Add", [routed, shared])
        return g.op1("Reshape", [out, g.op1("Shape", [x])])

    def qmoe(self, flat: str, probs: str, weights: str, p: str, names: Callable[[int], tuple[str, str, str]],
             limit: float | None = None) -> str:
        """``com.microsoft.QMoE`` over int4 experts; ``names(e) -> (gate, up, down)`` checkpoint names.

        Stacks are reserved in the data file and filled expert by expert (one expert's weights in memory).
        ``limit``: SwiGLU clamp (V4 ``swiglu_limit``: gate <= limit, |up| <= limit; QMoE's ``swiglu_limit``)."""
        g, ar, blk = self.g, self.a.arch, self.block
        E, D, inter = ar.n_experts, ar.hidden, ar.moe_inter
        fc1 = self.data.reserve(f"{p}.experts.fc1.qweight", (E, 2 * inter, D // 2), np.uint8)
        fc1s = self.data.reserve(f"{p}.experts.fc1.scales", (E, 2 * inter, D // blk), np.float32)
        fc2 = self.data.reserve(f"{p}.experts.fc2.qweight", (E, D, inter // 2), np.uint8)
        fc2s = self.data.reserve(f"{p}.experts.fc2.scales", (E, D, inter // blk), np.float32)
        for e in range(E):
            gn, un, dn = names(e)
            gate, up = quantize_int4(self._load(gn), blk), quantize_int4(self._load(un), blk)
            # swiglu_fusion=1: rows interleaved gate0, up0, gate1, up1, ...
            self.data.fill(fc1, torch.stack((gate.codes.flatten(1), up.codes.flatten(1)), dim=1).flatten(0, 1))
            self.data.fill(fc1s, torch.stack((gate.scales, up.scales), dim=1).flatten(0, 1))
            down = quantize_int4(self._load(dn), blk)
            self.data.fill(fc2, down.codes.flatten(1))
            self.data.fill(fc2s, down.scales)
        for r in (fc1, fc1s, fc2, fc2s):
            g.init(r.proto)
        inputs = [flat, probs, fc1.proto.name, fc1s.proto.name, "", fc2.proto.name, fc2s.proto.name] + [""] * 7
        extra = {} if limit is None else {"swiglu_limit": float(limit)}
        return g.op1("QMoE", inputs + [weights], domain=MS, k=ar.top_k, activation_type="swiglu",
                     swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=4,
                     block_size=blk, normalize_routing_weights=0, use_sparse_mixer=0, quant_type="int",
                     accuracy_level=self.acc, **extra)

    def dense_experts(self, flat: str, weights: str, chosen: str, p: str,
                      names: Callable[[int], tuple[str, str, str]], limit: float | None = None) -> str:
        """FP32 reference path: every expert on every token, weighted by ``[N, E]`` weights zero off the top-k."""
        g, ar = self.g, self.a.arch
        E, D, inter = ar.n_experts, ar.hidden, ar.moe_inter
        stacks = {k: self.data.reserve(f"{p}.experts.{k}", shp, np.float32)
                  for k, shp in (("w1", (E, D, inter)), ("w3", (E, D, inter)), ("w2", (E, inter, D)))}
        for e in range(E):
            for k, name in zip(("w1", "w3", "w2"), names(e)):
                self.data.fill(stacks[k], self._load(name).T.contiguous())
        w1, w3, w2 = (g.init(stacks[k].proto) for k in ("w1", "w3", "w2"))
        picked = g.op1("GatherElements", [weights, chosen], axis=1)
        zero = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
        dense = g.op1("ScatterElements", [g.op1("ConstantOfShape", [g.op1("Shape", [weights])], value=zero),
                                          chosen, picked], axis=1)                               # [N, E]
        x3 = g.op1("Unsqueeze", [flat, g.const([0])])                                              # [1, N, D]
        gt, up = self.clamp(g.op1("MatMul", [x3, w1]), g.op1("MatMul", [x3, w3]), limit)          # [E, N, I]
        y = g.op1("MatMul", [g.op1("Mul", [g.op1("Mul", [gt, g.op1("Sigmoid", [gt])]), up]), w2])  # [E, N, D]
        wt = g.op1("Unsqueeze", [g.op1("Transpose", [dense], perm=[1, 0]), g.const([-1])])        # [E, N, 1]
        return g.op1("ReduceSum", [g.op1("Mul", [y, wt]), g.const([0])], keepdims=0)

    # ------------------------------------------------------------------ whole model
    def build(self) -> tuple[list, list]:
        """Adds every node; returns ``(graph inputs, graph outputs)`` as ValueInfoProtos."""
        g, a, ar = self.g, self.a, self.a.arch
        W = latent_width(a)
        emb = self._f32("model.embed_tokens.weight", self._load("model.embed_tokens.weight"))
        h = g.op1("Gather", [emb, "input_ids"], axis=0)                                          # [B, T, D]
        inv, att = rope_inv_freq(ar.rope, a.rope_theta, a.yarn)
        ang = g.op1("Mul", [g.op1("Unsqueeze", [g.op1("Cast", ["position_ids"], to=TensorProto.FLOAT), g.const([-1])]),
                            g.const(inv.numpy(), np.float32)])                                   # [B, T, rope/2]
        cos = g.op1("Mul", [g.op1("Cos", [ang]), g.const(att, np.float32)])
        sin = g.op1("Mul", [g.op1("Sin", [ang]), g.const(att, np.float32)])
        # additive mask [B, 1, T, S]: key position <= query position, and attention_mask == 1
        total = g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const(1)], axis=0)
        kpos = g.op1("Range", [g.const(0), total, g.const(1)])                                   # [S]
        causal = g.op1("LessOrEqual", [kpos, g.op1("Unsqueeze", ["position_ids", g.const([-1])])])   # [B, T, S]
        valid = g.op1("Cast", [g.op1("Unsqueeze", ["attention_mask", g.const([1])])], to=TensorProto.BOOL)
        keep = g.op1("And", [causal, valid])
        causal_add = g.op1("Where", [keep, g.const(0.0, np.float32), g.const(NEG_INF, np.float32)])     # [B, T, S]
        mask = g.op1("Unsqueeze", [causal_add, g.const([1])])
        for L in range(ar.n_layers):
            p = f"model.layers.{L}"
            h = g.op1("Add", [h, self.attention(self.rms(h, f"{p}.input_layernorm.weight", a.rms_norm_eps),
                                                L, cos, sin, mask, causal_add)])
            x = self.rms(h, f"{p}.post_attention_layernorm.weight", a.rms_norm_eps)
            h = g.op1("Add", [h, self.moe(x, L) if ar.is_moe(L) else self.swiglu(x, f"{p}.mlp")])
        h = self.rms(h, "model.norm.weight", a.rms_norm_eps)
        g.op1("MatMul", [h, self._f32("lm_head.weight.T", self._load("lm_head.weight").T)], outputs=["logits"])
        F, I64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", I64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", I64, ["batch_size", "sequence_length"])]
        inputs += [helper.make_tensor_value_info(f"past_key_values.{L}.key", F,
                                                 ["batch_size", 1, "past_sequence_length", W])
                   for L in range(ar.n_layers)]
        if a.family is Family.V32:
            inputs += [helper.make_tensor_value_info(f"past_key_values.{L}.indexer_key", F,
                                                     ["batch_size", 1, "past_sequence_length", ar.index_dim])
                       for L in range(ar.n_layers)]
        outputs = [helper.make_tensor_value_info("logits", F, ["batch_size", "sequence_length", ar.vocab])]
        outputs += [helper.make_tensor_value_info(f"present.{L}.key", F, ["batch_size", 1, "total_sequence_length", W])
                    for L in range(ar.n_layers)]
        if a.family is Family.V32:
            outputs += [helper.make_tensor_value_info(f"present.{L}.indexer_key", F,
                                                      ["batch_size", 1, "total_sequence_length", ar.index_dim])
                        for L in range(ar.n_layers)]
        return inputs, outputs
