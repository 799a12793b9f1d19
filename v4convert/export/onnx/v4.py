"""DeepSeek V4 (``deepseek_v4``) as an onnxruntime graph, following ``runtime.deepseek_v4`` / ``v4_attention``
(transformers 5.24 ``DeepseekV4ForCausalLM`` semantics).

* Residual: ``hc_mult`` hyper-connection streams ``[B, T, hc, D]``; ``hc_pre`` (sigmoid pre/post weights, Sinkhorn-
  normalised ``comb`` with ``hc_sinkhorn_iters`` unrolled iterations), ``hc_post`` and ``hc_head`` from plain ops.
* Attention: one shared K=V head of ``head_dim``; q/kv RMS-normed, interleaved RoPE on the trailing ``rope`` channels
  ("main" rope on sliding layers, "compress" rope + YaRN on compressed ones), a sliding window of ``sliding_window``
  keys, plus compressed entries: HCA (ratio != 4) sees every complete entry, CSA (ratio 4, overlapping windows) the
  ``index_topk`` entries its lightning indexer picks; per-head sink logits join the softmax; the output is un-rotated
  and projected by the grouped ``wo_a`` (FP32, per group MatMul) and ``wo_b``.
* Caches (all ``[B, 1, S, width]``, full history): ``past_key_values.L.key`` (normed, rotated kv; the window is a
  mask, not a ring), and for compressed layers the raw compressor projections ``.compressor_kv`` /
  ``.compressor_gate`` (``indexer_compressor_*`` for CSA). Compressed entries are recomputed from them on every call
  (pure function of the token history: no incomplete-window state to carry), O(S) per step.
* MoE: sqrtsoftplus scores; top-k layers select on ``scores + bias``; hash layers (``num_hash_layers``) take their
  experts from ``tid2eid`` by Gather on ``input_ids`` (fed to QMoE as a 0/1 ``router_probs``); weights are the chosen
  unbiased scores normalised x ``routed_scaling_factor`` (``router_weights``); SwiGLU clamped at ``swiglu_limit``
  (QMoE ``swiglu_limit``; Clip on the shared expert). MXFP4 experts are re-quantized to int4 blocks (onnxruntime's
  CPU QMoE has no ``quant_type='fp4'`` kernel, and E2M1 x 2^e is not exactly int4 x scale: lossy, measured).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Role
from v4convert.runtime.common import rope_inv_freq
from v4convert.runtime.v4_args import AttnKind, V4Args

from .v3 import NEG_INF, V3Graph

V4_INT4_ROLES = frozenset({Role.ATTN_Q_A, Role.ATTN_Q_B, Role.ATTN_KV, Role.ATTN_O_B,
                           Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN,
                           Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN})
_W = ("w1", "w3", "w2")        # gate, up, down


def cache_widths(a: V4Args, L: int) -> dict[str, int]:
    """Cache name suffix -> width of layer ``L``'s caches."""
    ar = a.arch
    w = {"key": ar.head_dim}
    if a.kinds[L] is not AttnKind.SLIDING:
        c = 2 if a.kinds[L] is AttnKind.CSA else 1
        w |= {"compressor_kv": c * ar.head_dim, "compressor_gate": c * ar.head_dim}
    if a.kinds[L] is AttnKind.CSA:
        w |= {"indexer_compressor_kv": 2 * ar.index_dim, "indexer_compressor_gate": 2 * ar.index_dim}
    return w


class V4Graph(V3Graph):
    int4_roles = V4_INT4_ROLES

    @staticmethod
    def parse_args(ck: Checkpoint) -> V4Args:
        return V4Args.from_config(ck.config, str(ck.root / "config.json"))

    def rope_width(self) -> int:
        return self.a.rope_dim

    # ------------------------------------------------------------------ pieces
    def unit_rms(self, x: str) -> str:
        g = self.g
        ms = g.op1("ReduceMean", [g.op1("Mul", [x, x]), g.const([-1])], keepdims=1)
        return g.op1("Mul", [x, g.op1("Reciprocal", [g.op1("Sqrt", [g.op1("Add", [ms, g.const(self.a.rms_norm_eps,
                                                                                                np.float32)])])])])

    def rope_tail(self, x: str, cos: str, sin: str, rank: int, width: int) -> str:
        """Interleaved RoPE on the trailing ``rope_dim`` channels of ``x [..., width]``."""
        g, rd = self.g, self.a.rope_dim
        head, tail = g.op("Split", [x, g.const([width - rd, rd])], n_out=2, axis=-1)
        return g.op1("Concat", [head, self.rope(tail, cos, sin, rank, interleaved=True)], axis=-1)

    def tables(self, pos_f: str, compressed: bool) -> tuple[str, str]:
        """``cos, sin [..., rope/2]`` for float positions ``pos_f [...]``."""
        a, g = self.a, self.g
        inv, att = (rope_inv_freq(a.rope_dim, a.compress_rope_theta, a.yarn) if compressed
                    else rope_inv_freq(a.rope_dim, a.rope_theta))
        ang = g.op1("Mul", [g.op1("Unsqueeze", [pos_f, g.const([-1])]), g.const(inv.numpy(), np.float32)])
        return (g.op1("Mul", [g.op1("Cos", [ang]), g.const(att, np.float32)]),
                g.op1("Mul", [g.op1("Sin", [ang]), g.const(att, np.float32)]))

    def cache(self, L: int, name: str, new: str) -> str:
        """Append ``new [B, T, w]`` to ``past_key_values.L.name``; returns the full history ``[B, S, w]``."""
        g = self.g
        full = g.op1("Concat", [f"past_key_values.{L}.{name}", g.op1("Unsqueeze", [new, g.const([1])])], axis=2,
                     outputs=[f"present.{L}.{name}"])
        return g.op1("Squeeze", [full, g.const([1])])

    def hc_pre(self, X: str, p: str) -> tuple[str, str, str]:
        """``(post [B,T,hc], comb [B,T,hc,hc], collapsed [B,T,D])`` of hyper-connection ``p`` (``runtime.hc_pre``)."""
        g, a, hc = self.g, self.a, self.a.arch.hc_mult
        eps = g.const(a.hc_eps, np.float32)
        flat = g.op1("Reshape", [X, g.const([0, 0, hc * a.arch.hidden])])
        mixes = g.op1("MatMul", [self.unit_rms(flat), self._f32(f"{p}_fn.T", self._load(f"{p}_fn").T)])
        pre_w, post_w, comb_w = g.op("Split", [mixes, g.const([hc, hc, hc * hc])], n_out=3, axis=-1)
        base = self._load(f"{p}_base")
        scale = self._load(f"{p}_scale")
        pre_b, post_b, comb_b = g.op("Split", [self._f32(f"{p}_base", base), g.const([hc, hc, hc * hc])], n_out=3)
        s_pre, s_post, s_comb = g.op("Split", [self._f32(f"{p}_scale", scale), g.const([1, 1, 1])], n_out=3)
        pre = g.op1("Add", [g.op1("Sigmoid", [g.op1("Add", [g.op1("Mul", [pre_w, s_pre]), pre_b])]), eps])
        post = g.op1("Mul", [g.op1("Sigmoid", [g.op1("Add", [g.op1("Mul", [post_w, s_post]), post_b])]),
                             g.const(2.0, np.float32)])
        logits = g.op1("Add", [g.op1("Mul", [g.op1("Reshape", [comb_w, g.const([0, 0, hc, hc])]), s_comb]),
                               g.op1("Reshape", [comb_b, g.const([hc, hc])])])
        comb = g.op1("Add", [g.op1("Softmax", [logits], axis=-1), eps])

        def norm(c: str, axis: int) -> str:
            return g.op1("Div", [c, g.op1("Add", [g.op1("ReduceSum", [c, g.const([axis])], keepdims=1), eps])])

        comb = norm(comb, -2)
        for _ in range(a.hc_sinkhorn_iters - 1):
            comb = norm(norm(comb, -1), -2)
        collapsed = g.op1("ReduceSum", [g.op1("Mul", [g.op1("Unsqueeze", [pre, g.const([-1])]), X]), g.const([2])],
                          keepdims=0)
        return post, comb, collapsed

    def hc_post(self, X: str, out: str, post: str, comb: str) -> str:
        g = self.g
        return g.op1("Add", [g.op1("Mul", [g.op1("Unsqueeze", [post, g.const([-1])]),
                                           g.op1("Unsqueeze", [out, g.const([-2])])]),
                             g.op1("MatMul", [g.op1("Transpose", [comb], perm=[0, 1, 3, 2]), X])])

    def compress(self, kv: str, gate: str, p: str, ratio: int, overlap: bool, d: int) -> str:
        """Compressed entries ``[B, n, d]`` (n = S // ratio) from raw projections ``kv, gate [B, S, c*d]``
        (``runtime.v4_attention.Compressor``: gated softmax pooling, overlap series, RMSNorm, rope at ``w*ratio``)."""
        g, r = self.g, ratio
        c = 2 if overlap else 1
        S = g.op1("Shape", [kv], start=1, end=2)
        n = g.op1("Div", [S, g.const([r])])
        used = g.op1("Mul", [n, g.const([r])])
        B = g.op1("Shape", [kv], start=0, end=1)
        shp = g.op1("Concat", [B, n, g.const([r, c * d])], axis=0)

        def windows(t: str) -> str:
            return g.op1("Reshape", [g.op1("Slice", [t, g.const([0]), used, g.const([1])]), shp])   # [B,n,r,c*d]

        ck = windows(kv)
        cg = g.op1("Add", [windows(gate), self._f32(f"{p}.ape", self._load(f"{p}.ape"))])
        if overlap:
            pad_shape = g.op1("Concat", [B, g.const([1, r, d])], axis=0)
            zero = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
            ninf = helper.make_tensor("n", TensorProto.FLOAT, [1], [NEG_INF])

            def series(t: str, fill) -> str:
                a_, b_ = g.op("Split", [t, g.const([d, d])], n_out=2, axis=-1)                  # Ca, Cb
                prev = g.op1("Concat", [g.op1("ConstantOfShape", [pad_shape], value=fill), a_], axis=1)
                prev = g.op1("Slice", [prev, g.const([0]), n, g.const([1])])                     # window w-1's Ca
                return g.op1("Concat", [prev, b_], axis=2)                                       # [B,n,2r,d]

            ck, cg = series(ck, zero), series(cg, ninf)
        pooled = g.op1("ReduceSum", [g.op1("Mul", [ck, g.op1("Softmax", [cg], axis=2)]), g.const([2])], keepdims=0)
        comp = self.rms(pooled, f"{p}.norm.weight", self.a.rms_norm_eps)                          # [B,n,d]
        epos = g.op1("Cast", [g.op1("Mul", [g.op1("Range", [g.const(0), g.op1("Squeeze", [n, g.const([0])]),
                                                            g.const(1)]), g.const(r)])], to=TensorProto.FLOAT)
        cos, sin = self.tables(epos, compressed=True)                                            # [n, rope/2]
        return self.rope_tail(comp, cos, sin, rank=3, width=d)

    def attention(self, x: str, L: int, ctx: dict) -> str:
        g, a, ar = self.g, self.a, self.a.arch
        H, Dh, kind, r = ar.n_heads, ar.head_dim, a.kinds[L], a.ratios[L]
        p = f"layers.{L}.attn"
        comp_rope = kind is not AttnKind.SLIDING
        cos, sin = ctx["rope_c" if comp_rope else "rope_m"]
        cos4, sin4 = (g.op1("Unsqueeze", [t, g.const([2])]) for t in (cos, sin))
        qr = self.rms(self.linear(x, f"{p}.wq_a.weight"), f"{p}.q_norm.weight", a.rms_norm_eps)
        q = g.op1("Reshape", [self.linear(qr, f"{p}.wq_b.weight"), g.const([0, 0, H, Dh])])
        q = self.rope_tail(self.unit_rms(q), cos4, sin4, rank=4, width=Dh)                        # [B,T,H,Dh]
        kv = self.rope_tail(self.rms(self.linear(x, f"{p}.wkv.weight"), f"{p}.norm.weight", a.rms_norm_eps),
                            cos, sin, rank=3, width=Dh)
        keys = self.cache(L, "key", kv)                                                          # [B,S,Dh]
        mask = ctx["window"]                                                                     # [B,T,S]
        if kind is not AttnKind.SLIDING:
            ckv = self.cache(L, "compressor_kv", self.dense_linear(x, f"{p}.compressor.wkv.weight"))
            cgt = self.cache(L, "compressor_gate", self.dense_linear(x, f"{p}.compressor.wgate.weight"))
            entries = self.compress(ckv, cgt, f"{p}.compressor", r, kind is AttnKind.CSA, Dh)     # [B,n,Dh]
            limit = g.op1("Div", [g.op1("Add", [ctx["qpos"], g.const(1)]), g.const(r)])            # [B,T,1]
            n = g.op1("Shape", [entries], start=1, end=2)
            ent = g.op1("Range", [g.const(0), g.op1("Squeeze", [n, g.const([0])]), g.const(1)])
            complete = g.op1("Less", [ent, limit])                                                 # [B,T,n]
            if kind is AttnKind.CSA:
                sel = self.v4_indexer(x, qr, L, ctx, complete, r)
            else:
                sel = g.op1("Where", [complete, g.const(0.0, np.float32), g.const(NEG_INF, np.float32)])
            keys = g.op1("Concat", [keys, entries], axis=1)
            mask = g.op1("Concat", [mask, sel], axis=-1)
        k4 = g.op1("Unsqueeze", [keys, g.const([1])])                                            # [B,1,L,Dh]
        scores = g.op1("MatMul", [g.op1("Transpose", [q], perm=[0, 2, 1, 3]),
                                  g.op1("Transpose", [k4], perm=[0, 1, 3, 2])])                   # [B,H,T,L]
        scores = g.op1("Add", [g.op1("Mul", [scores, g.const(Dh ** -0.5, np.float32)]),
                               g.op1("Unsqueeze", [mask, g.const([1])])])
        sink = g.op1("Reshape", [self._f32(f"{p}.attn_sink", self._load(f"{p}.attn_sink")), g.const([1, H, 1, 1])])
        sshape = g.op1("Concat", [g.op1("Shape", [scores], start=0, end=3), g.const([1])], axis=0)
        logits = g.op1("Concat", [scores, g.op1("Expand", [sink, sshape])], axis=-1)
        probs = g.op1("Slice", [g.op1("Softmax", [logits], axis=-1), g.const([0]), g.const([-1]), g.const([3])])
        out = g.op1("Transpose", [g.op1("MatMul", [probs, k4])], perm=[0, 2, 1, 3])                # [B,T,H,Dh]
        out = self.rope_tail(out, cos4, g.op1("Neg", [sin4]), rank=4, width=Dh)
        G, ol = ar.o_groups, ar.o_lora
        wa = self._load(f"{p}.wo_a.weight").view(G, ol, -1).transpose(1, 2)                      # [G, H*Dh/G, o_lora]
        grouped = g.op1("Transpose", [g.op1("Reshape", [out, g.const([0, 0, G, H * Dh // G])])], perm=[0, 2, 1, 3])
        grouped = g.op1("MatMul", [grouped, self._f32(f"{p}.wo_a.weight.grouped_t", wa)])          # [B,G,T,o_lora]
        grouped = g.op1("Reshape", [g.op1("Transpose", [grouped], perm=[0, 2, 1, 3]), g.const([0, 0, G * ol])])
        return self.linear(grouped, f"{p}.wo_b.weight")

    def v4_indexer(self, x: str, qr: str, L: int, ctx: dict, complete: str, r: int) -> str:
        """CSA lightning indexer -> additive ``[B, T, n]`` (0 for the chosen complete entries, -inf elsewhere)."""
        g, ar = self.g, self.a.arch
        Hi, Di = ar.index_heads, ar.index_dim
        p = f"layers.{L}.attn.indexer"
        ikv = self.cache(L, "indexer_compressor_kv", self.dense_linear(x, f"{p}.compressor.wkv.weight"))
        igt = self.cache(L, "indexer_compressor_gate", self.dense_linear(x, f"{p}.compressor.wgate.weight"))
        ient = self.compress(ikv, igt, f"{p}.compressor", r, True, Di)                              # [B,n,Di]
        cos, sin = ctx["rope_c"]
        cos4, sin4 = (g.op1("Unsqueeze", [t, g.const([2])]) for t in (cos, sin))
        q = g.op1("Reshape", [self.dense_linear(qr, f"{p}.wq_b.weight"), g.const([0, 0, Hi, Di])])
        q = self.rope_tail(q, cos4, sin4, rank=4, width=Di)
        sc = g.op1("MatMul", [g.op1("Transpose", [q], perm=[0, 2, 1, 3]),
                              g.op1("Transpose", [g.op1("Unsqueeze", [ient, g.const([1])])], perm=[0, 1, 3, 2])])
        sc = g.op1("Mul", [g.op1("Relu", [sc]), g.const(Di ** -0.5, np.float32)])                  # [B,Hi,T,n]
        w = g.op1("Mul", [self.dense_linear(x, f"{p}.weights_proj.weight"), g.const(Hi ** -0.5, np.float32)])
        w = g.op1("Unsqueeze", [g.op1("Transpose", [w], perm=[0, 2, 1]), g.const([-1])])          # [B,Hi,T,1]
        score = g.op1("ReduceSum", [g.op1("Mul", [sc, w]), g.const([1])], keepdims=0)             # [B,T,n]
        score = g.op1("Where", [complete, score, g.const(NEG_INF, np.float32)])
        k = g.op1("Min", [g.op1("Shape", [score], start=-1), g.const([self.a.index_topk])])
        top = g.op("TopK", [score, k], n_out=2, axis=-1)[1]                                         # [B,T,k]
        ok = g.op1("Where", [g.op1("GatherElements", [complete, top], axis=-1), g.const(0.0, np.float32),
                             g.const(NEG_INF, np.float32)])
        ninf = helper.make_tensor("n", TensorProto.FLOAT, [1], [NEG_INF])
        return g.op1("ScatterElements", [g.op1("ConstantOfShape", [g.op1("Shape", [score])], value=ninf), top, ok],
                     axis=-1)

    def v4_moe(self, x: str, L: int) -> str:
        g, a, ar = self.g, self.a, self.a.arch
        p = f"layers.{L}.ffn"
        k = ar.top_k
        flat = g.op1("Reshape", [x, g.const([-1, ar.hidden])])
        logits = g.op1("MatMul", [flat, self._f32(f"{p}.gate.weight.T", self._load(f"{p}.gate.weight").T)])
        scores = g.op1("Sqrt", [g.op1("Softplus", [logits])])                                     # [N, E]
        zero = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
        if a.hash_layers[L]:
            table = self.g.init(self.data.add(f"{p}.gate.tid2eid", self._load(f"{p}.gate.tid2eid").long()))
            chosen = g.op1("Reshape", [g.op1("Gather", [table, "input_ids"], axis=0), g.const([-1, k])])   # [N, k]
            ones = g.op1("ConstantOfShape", [g.op1("Shape", [chosen])],
                         value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0]))
            probs = g.op1("ScatterElements", [g.op1("ConstantOfShape", [g.op1("Shape", [scores])], value=zero),
                                              chosen, ones], axis=1)
        else:
            probs = g.op1("Add", [scores, self._f32(f"{p}.gate.bias", self._load(f"{p}.gate.bias"))])
            chosen = g.op("TopK", [probs, g.const([k])], n_out=2, axis=-1)[1]
        picked = g.op1("GatherElements", [scores, chosen], axis=1)
        denom = g.op1("Add", [g.op1("ReduceSum", [picked, g.const([-1])], keepdims=1), g.const(1e-20, np.float32)])
        weights = g.op1("Mul", [g.op1("Div", [scores, denom]), g.const(a.router.routed_scaling_factor, np.float32)])

        def names(e: int) -> tuple[str, ...]:              # expert e's w1, w3, w2 tensor names
            return tuple(f"{p}.experts.{e}.{w}.weight" for w in _W)

        if self.int4:
            routed = self.qmoe(flat, probs, weights, p, names, limit=a.swiglu_limit)
        else:
            routed = self.dense_experts(flat, weights, chosen, p, names, limit=a.swiglu_limit)
        shared = self.swiglu(flat, f"{p}.shared_experts", names=_W, limit=a.swiglu_limit)
        return g.op1("Reshape", [g.op1("Add", [routed, shared]), g.op1("Shape", [x])])

    # ------------------------------------------------------------------ whole model
    def build(self) -> tuple[list, list]:
        g, a, ar = self.g, self.a, self.a.arch
        hc, D = ar.hc_mult, ar.hidden
        emb = self._f32("embed.weight", self._load("embed.weight"))
        h = g.op1("Gather", [emb, "input_ids"], axis=0)                                          # [B,T,D]
        X = g.op1("Expand", [g.op1("Unsqueeze", [h, g.const([2])]), g.const([1, 1, hc, 1])])       # [B,T,hc,D]
        pos_f = g.op1("Cast", ["position_ids"], to=TensorProto.FLOAT)
        qpos = g.op1("Unsqueeze", ["position_ids", g.const([-1])])                                 # [B,T,1]
        total = g.op1("Gather", [g.op1("Shape", ["attention_mask"]), g.const(1)], axis=0)
        kpos = g.op1("Range", [g.const(0), total, g.const(1)])                                   # [S]
        inside = g.op1("And", [g.op1("LessOrEqual", [kpos, qpos]),
                               g.op1("Greater", [kpos, g.op1("Sub", [qpos, g.const(a.window)])])])
        valid = g.op1("Cast", [g.op1("Unsqueeze", ["attention_mask", g.const([1])])], to=TensorProto.BOOL)
        window = g.op1("Where", [g.op1("And", [inside, valid]), g.const(0.0, np.float32), g.const(NEG_INF, np.float32)])
        ctx = {"rope_m": self.tables(pos_f, False), "rope_c": self.tables(pos_f, True), "qpos": qpos,
               "window": window}
        for L in range(ar.n_layers):
            p = f"layers.{L}"
            post, comb, x = self.hc_pre(X, f"{p}.hc_attn")
            X = self.hc_post(X, self.attention(self.rms(x, f"{p}.attn_norm.weight", a.rms_norm_eps), L, ctx),
                             post, comb)
            post, comb, x = self.hc_pre(X, f"{p}.hc_ffn")
            X = self.hc_post(X, self.v4_moe(self.rms(x, f"{p}.ffn_norm.weight", a.rms_norm_eps), L), post, comb)
        flat = g.op1("Reshape", [X, g.const([0, 0, hc * D])])
        mixes = g.op1("MatMul", [self.unit_rms(flat), self._f32("hc_head_fn.T", self._load("hc_head_fn").T)])
        pre = g.op1("Add", [g.op1("Sigmoid", [g.op1("Add", [
            g.op1("Mul", [mixes, self._f32("hc_head_scale", self._load("hc_head_scale"))]),
            self._f32("hc_head_base", self._load("hc_head_base"))])]), g.const(a.hc_eps, np.float32)])
        h = g.op1("ReduceSum", [g.op1("Mul", [g.op1("Unsqueeze", [pre, g.const([-1])]), X]), g.const([2])], keepdims=0)
        h = self.rms(h, "norm.weight", a.rms_norm_eps)
        g.op1("MatMul", [h, self._f32("head.weight.T", self._load("head.weight").T)], outputs=["logits"])
        F, I64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", I64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", I64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", F, ["batch_size", "sequence_length", ar.vocab])]
        for L in range(ar.n_layers):
            for name, w in cache_widths(a, L).items():
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{L}.{name}", F,
                                                            ["batch_size", 1, "past_sequence_length", w]))
                outputs.append(helper.make_tensor_value_info(f"present.{L}.{name}", F,
                                                             ["batch_size", 1, "total_sequence_length", w]))
        return inputs, outputs
