"""Layer-sequential statistics pass through the runtime's own block code (V3/V3.1, V3.2, V4), streamed.

For every linear about to be quantized we collect, from its inputs ``x [n, K]`` on the calibration windows:

* ``h``: ``X^T X / n`` (float32 ``[K, K]``, accumulated in float64) — GPTQ's Hessian; its diagonal is the
  per-input-channel mean of ``x^2`` the activation-weighted search uses;
* ``amax``: ``max |x|`` (static per-tensor activation scale for W4A4);
* ``count``: rows seen (for a routed expert: the tokens routed to it = its coverage).

Memory (the point of this module): the runtime model is built on the meta device (``_meta_model``) and only
one block's weights are materialized from the checkpoint at a time (``layers.StreamedModel``): the embedding
for the capture, then block L, which is freed before L+1. Inside an MoE block the routed experts are never
all resident: the block runs with its experts replaced by a recorder (each expert's routed input rows are
kept, ``[rows, D]``), then experts are loaded one at a time (dequantize, statistics on the recorded rows,
quantize, outputs for the propagated pass, free), and the block runs once more with the experts replaced by
those outputs — so the runtime's own ``moe_dispatch`` does the weighted, ascending-expert accumulation and
the result is bit-identical to running the whole model. RAM is bounded by the non-expert part of one block,
one expert, their statistics, and the hidden states / recorded rows; the latter go to a memory-mapped file
in ``spill_dir`` when they exceed ``spill_bytes``. Statistics of a finished layer (or expert) are handed to
``sink`` when one is given (then not kept), so a caller can write them out as they come. A block's
non-expert statistics are collected in passes of at most ``stats_bytes`` of float64 ``X^T X`` (re-running
the same block on the same inputs; V3's o_proj alone is 2 GiB), quantized aside and replaced after the last
pass. Measured (``bench/calibration_fullsize.py``): a full-size V3 MoE layer, 512 tokens, peak RSS 5.4 GiB.

Order: block 0's call arguments are captured from the model's own forward (hidden state + what every block
of the family receives: positions, rope, mask, ids). Then for layer L: block L runs on the saved hidden
states (its linears' stats are recorded), ``quantize(name, w, stats, group_amax)`` replaces L's weights by
their dequantized quantized values, and (``propagate=True``, the default) block L runs again so layer L+1
sees the *quantized* layer's outputs; ``propagate=False`` feeds L+1 the original outputs.

``target_original`` (``--gptq-target original``; needs ``propagate``): a second hidden-state stream, the original
model's, runs beside the quantized one (each block once more on it with the original weights; an MoE block's
experts are loaded once more for it), and every target linear also gets ``xc = X^T X~`` (``X`` its inputs in the
original model, ``X~`` in the partly quantized one, the same tokens: the linear's inputs are captured in a run on
the original stream just before the statistics run and paired call by call; a routed expert pairs its routed
rows with the original stream's MoE input of the same tokens). GPTQ then aims at the original outputs
(``quant.methods.gptq.original_target``). Extra memory: the captured inputs of one pass (spilled like the rest).

``sequential`` (``--true-sequential``; needs ``propagate``): inside a block the linears are quantized in stages
(``SEQUENTIAL_STAGES``: attention inputs, output projections, gate/up, down), each stage's statistics taken with
the earlier stages already quantized (one more block run per stage); a routed expert's statistics come from the
rows recorded after the block's attention and shared experts are quantized (else from the original attention's
rows), gate/up before down. Coverage then counts that routing.

``all_experts``: every calibration token also goes through every routed expert for *statistics only*
(the layer output still uses the real routing); coverage counts stay the routed counts.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Role

from .data import CalibData
from .linstats import LinearStats
from .stream import SPILL_BYTES, Spill, StreamedModel

# --true-sequential stages (by role; a role not listed is stage 0): a stage's statistics see the earlier ones quantized
SEQUENTIAL_STAGES = {Role.ATTN_O: 1, Role.ATTN_O_A: 1, Role.ATTN_O_B: 2,
                     Role.DENSE_GATE: 3, Role.DENSE_UP: 3, Role.SHARED_GATE: 3, Role.SHARED_UP: 3,
                     Role.EXPERT_GATE: 3, Role.EXPERT_UP: 3, Role.DENSE_DOWN: 4, Role.SHARED_DOWN: 4,
                     Role.EXPERT_DOWN: 4}
STATS_BYTES = 1 << 30    # float64 X^T X of a block's non-expert linears held at once (o_proj of V3: 2 GiB alone)


@dataclass
class Collected:
    stats: dict[str, LinearStats]                     # checkpoint tensor name -> stats (empty with a sink)
    coverage: dict[int, list[int]] = field(default_factory=dict)   # MoE layer -> routed tokens per expert
    tokens: int = 0                                   # calibration tokens


Quantizer = Callable[[str, torch.Tensor, "LinearStats | None", torch.Tensor], torch.Tensor]


class _Experts(nn.Module):
    """Stands in for an MoE's ``experts`` ModuleList inside ``moe_dispatch`` (which only uses ``len`` and
    ``experts[e](x_rows)``). ``record``: keep each expert's input rows, return zeros; ``replay``: return the
    outputs computed expert by expert (checked to be for the same rows)."""

    def __init__(self, n: int, spill: Spill | None, replay: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.n, self.spill, self.replay = n, spill, replay
        self.rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(x: torch.Tensor) -> torch.Tensor:
            if self.replay is not None:
                y = self.replay.pop(e)
                if y.shape != x.shape:
                    raise RuntimeError(f"expert {e}: replayed output {tuple(y.shape)} for input {tuple(x.shape)}")
                return y
            if self.spill is not None:
                self.rows[e] = self.spill.keep(x)
            return torch.zeros_like(x)
        return call


def _moe(block: nn.Module) -> nn.Module | None:
    moe = getattr(block, "mlp", None) or getattr(block, "ffn", None)
    return moe if moe is not None and hasattr(moe, "experts") else None


class _Pass:
    """State of one statistics pass: hooks on every target linear, stats being filled, coverage."""

    def __init__(self, sm: StreamedModel, targets: list[str], layer_of: dict, expert_of: dict, *,
                 quantize: Quantizer | None, groups: dict[str, list[str]] | None, propagate: bool,
                 all_experts: bool, sink: Callable[[str, LinearStats], None] | None, spill: Spill,
                 stats_bytes: int = STATS_BYTES, target_original: bool = False,
                 stage_of: dict[str, int] | None = None) -> None:
        from v4convert.runtime.common import Linear
        self.sm, self.targets, self.layer_of, self.expert_of = sm, targets, layer_of, expert_of
        self.quantize, self.groups, self.all_experts, self.spill = quantize, groups or {}, all_experts, spill
        self.requant = propagate and quantize is not None
        self.pair = target_original and self.requant     # paired original-stream inputs -> LinearStats.xc
        if self.pair and all_experts:
            raise ValueError("target_original does not pair the all_experts broadcast")
        self.stage_of = stage_of if self.requant else None   # sequential stages (None: one stage)
        self.originals: dict[str, torch.Tensor] = {}      # pair + sequential: replaced weights, for capture runs
        self.capturing = False                           # lin hooks keep inputs in ``xo`` instead of adding stats
        self.xo: dict[str, list[torch.Tensor]] = {}
        self.taken: dict[str, int] = {}
        self.stats_bytes = stats_bytes
        self.mods: dict[str, Linear] = {}
        for n in targets:
            m = sm.model.get_submodule(sm.rename(n)[: -len(".weight")])
            if not isinstance(m, Linear):
                raise TypeError(f"{n}: runtime module {type(m).__name__} is not a Linear")
            self.mods[n] = m
        self.stats: dict[str, LinearStats] = {}
        self.kept: dict[str, LinearStats] = {}
        self.sink = sink or self.kept.__setitem__
        self.coverage: dict[int, list[int]] = {}
        self.active: set[str] = set()
        self.counting = False                       # the router hook adds to ``coverage``
        self.broadcast = False
        # experts whose stats come only from the broadcast pass (all_experts)
        self.broadcast_only = {n: all_experts and expert_of[n] is not None for n in targets}

    # ---------------------------------------------------------------- hooks and stats
    def hooks(self) -> list:
        def lin_hook(name):
            def hook(mod, args):
                if name in self.active and (not self.broadcast_only[name] or self.broadcast):
                    x = args[0]
                    if self.capturing:
                        self.xo.setdefault(name, []).append(self.spill.keep(x.reshape(-1, x.shape[-1]).clone()))
                    elif self.pair:
                        i = self.taken.get(name, 0)
                        self.taken[name] = i + 1
                        self.stats[name].add(x, self.xo[name][i])
                    else:
                        self.stats[name].add(x)
            return hook
        return [m.register_forward_pre_hook(lin_hook(n)) for n, m in self.mods.items()]

    def count_hook(self, layer: int, n_exp: int):
        def hook(mod, args, out):
            if self.counting:
                idx = out[1].reshape(-1)
                c = torch.bincount(idx[idx >= 0], minlength=n_exp).tolist()
                self.coverage[layer] = [a + b for a, b in zip(self.coverage.get(layer, [0] * n_exp), c)]
        return hook

    def start(self, names: list[str]) -> None:
        for n in names:
            k = self.mods[n].in_features
            self.stats[n] = LinearStats(torch.zeros(k, k, dtype=torch.float64),
                                        xc=torch.zeros(k, k, dtype=torch.float64) if self.pair else None)

    def capture(self, run: Callable[[], object]) -> None:
        """``run()`` (on the original stream) keeps the active linears' inputs for the next, paired run."""
        self.xo, self.taken, self.capturing = {}, {}, True
        swapped = {n: self.mods[n].weight.data.clone() for n in self.originals}   # earlier stages: original weights
        for n, w in self.originals.items():
            self.mods[n].weight.data.copy_(w)
        try:
            run()
        finally:
            self.capturing = False
            for n, w in swapped.items():
                self.mods[n].weight.data.copy_(w)

    def replace(self, q: dict[str, torch.Tensor]) -> None:
        """Replace weights by their quantized values (keeping the originals for capture runs when staged)."""
        for n, w in q.items():
            if self.pair and self.stage_of is not None:
                self.originals[n] = self.mods[n].weight.data.clone()
            self.mods[n].weight.data.copy_(w)

    def stages(self, names: list[str]) -> list[list[str]]:
        """``names`` in sequential stages (one stage, ``[names]``, unless ``sequential``)."""
        if self.stage_of is None or not names:
            return [names]
        by: dict[int, list[str]] = {}
        for n in names:
            by.setdefault(self.stage_of[n], []).append(n)
        return [by[k] for k in sorted(by)]

    def paired(self) -> None:
        """After the paired run: every captured call was used (same calls in both runs), then dropped."""
        for n, xs in self.xo.items():
            if self.taken.get(n, 0) != len(xs):
                raise RuntimeError(f"{n}: {len(xs)} original-stream calls, {self.taken.get(n, 0)} paired")  # our bug
        self.xo, self.taken = {}, {}

    def finish(self, names: list[str]) -> None:
        for n in names:
            s = self.stats.pop(n)
            if s.count:
                self.sink(n, s)

    def quantized(self, n: str) -> torch.Tensor:
        """The quantized (dequantized) weight of resident ``n``; the global amax over its fused partners is
        taken from their current weights, which are still the original ones (replacement comes after)."""
        w = self.mods[n].weight
        g = torch.stack([self.mods[p].weight.detach().abs().amax().float() for p in self.groups.get(n, [n])]).amax()
        s = self.stats[n]
        return self.quantize(n, w.data, s if s.count else None, g).to(w.dtype)

    def passes(self, names: list[str]) -> list[list[str]]:
        """``names`` split so that one pass's float64 ``X^T X`` stay within ``stats_bytes`` (largest first; a
        linear larger than the budget alone). One pass for small models."""
        size = {n: (16 if self.pair else 8) * self.mods[n].in_features ** 2 for n in names}
        out: list[list[str]] = []
        used = 0
        for n in sorted(names, key=lambda n: -size[n]):
            if not out or used + size[n] > self.stats_bytes:
                out.append([])
                used = 0
            out[-1].append(n)
            used += size[n]
        return out or [[]]

    def stats_then_quantize(self, names: list[str], run: Callable[[bool], object],
                            run_original: Callable[[], object] | None = None, count: bool = True) -> object:
        """``_stage`` of each of ``stages(names)`` in turn (``run(first)``: first is the very first run; routing
        counted then if ``count``). Returns the first run's result."""
        first = None
        for k, part in enumerate(self.stages(names)):
            r = self._stage(part, run if k == 0 else lambda _: run(False), run_original, count and k == 0)
            first = r if k == 0 else first
        return first

    def _stage(self, names: list[str], run: Callable[[bool], object], run_original: Callable[[], object] | None,
               count: bool) -> object:
        """Stats of ``names`` from ``run(first)`` on the original weights, in as many passes as ``passes``
        needs (each a re-run of the same deterministic block on the same inputs, so each linear sees the same
        rows); with ``requant`` each pass's linears are quantized aside and all replaced once every pass is
        done. ``pair``: each pass first captures the inputs from ``run_original()`` (the original stream).
        Returns the first pass's result."""
        first, aside = None, {}
        for i, part in enumerate(self.passes(names)):
            self.start(part)
            self.active = set(part)
            if self.pair and part:
                self.capture(run_original)
            self.counting = count and i == 0
            try:
                r = run(i == 0)
            finally:
                self.active, self.counting = set(), False
            self.paired()
            first = r if i == 0 else first
            if self.requant:
                for n in part:
                    aside[n] = self.quantized(n)
            self.finish(part)
        self.replace(aside)
        return first

    # ---------------------------------------------------------------- running
    def run_block(self, li: int, inputs: list[tuple], keep: bool = True) -> list[tuple]:
        """Block ``li`` on every batch; ``keep``: the outputs are kept (spilled when large)."""
        out = []
        for args in inputs:
            y = self.sm.blocks[li](*args)
            out.append((self.spill.keep(y) if keep else None,) + tuple(args[1:]))
        return out

    def dense_layer(self, li: int, names: list[str], inputs: list[tuple],
                    orig: list[tuple] | None) -> tuple[list[tuple], list[tuple] | None]:
        """(quantized-stream outputs, original-stream outputs or None without ``pair``)."""
        requant = self.requant and bool(names)
        orig_out = self.run_block(li, orig) if self.pair else None        # before any weight is replaced
        outputs = self.stats_then_quantize(names, lambda first: self.run_block(li, inputs, first and not requant),
                                           lambda: self.run_block(li, orig, keep=False))
        if requant:
            outputs = self.run_block(li, inputs)          # the next layer sees the quantized layer's output
        self.originals = {}
        return outputs, orig_out

    def record(self, li: int, moe: nn.Module, inputs: list[tuple], keep: bool,
               moe_input: bool = False) -> tuple[list[dict], list, list]:
        """Run block ``li`` with the routed experts replaced by a recorder: per batch, each expert's input rows,
        the MoE's whole input ``[N, D]`` (for ``all_experts``, or ``moe_input``) and the routing ``idx [N, top-k]``;
        nothing kept unless ``keep``."""
        real = moe.experts
        rows, whole, idxs = [], [], []
        grab = moe.register_forward_pre_hook(
            lambda mod, args: whole.append(self.spill.keep(args[0].reshape(-1, args[0].shape[-1])))
            if keep and (self.all_experts or moe_input) else None)
        route = moe.gate.register_forward_hook(
            lambda mod, args, out: idxs.append(out[1].reshape(-1, out[1].shape[-1])) if keep else None)
        try:
            for args in inputs:
                moe.experts = rec = _Experts(len(real), self.spill if keep else None)
                self.sm.blocks[li](*args)
                rows.append(rec.rows)
        finally:
            moe.experts = real
            grab.remove()
            route.remove()
        return rows, whole, idxs

    def replay(self, li: int, moe: nn.Module, inputs: list[tuple], outs: list[dict[int, torch.Tensor]]) -> list[tuple]:
        """Block ``li`` on ``inputs`` with the routed experts' outputs ``outs`` (per batch, per expert) replayed."""
        real, out = moe.experts, []
        try:
            for args, o in zip(inputs, outs):
                moe.experts = _Experts(len(real), self.spill, replay=o)
                out.append((self.spill.keep(self.sm.blocks[li](*args)),) + tuple(args[1:]))
        finally:
            moe.experts = real
        return out

    def original_moe(self, li: int, moe: nn.Module, orig: list[tuple]) -> tuple[list[tuple], list[torch.Tensor]]:
        """``pair``: the original stream through MoE block ``li`` with its original weights (experts loaded one at
        a time): (its outputs, the MoE's input ``[N, D]`` per batch)."""
        rows, moe_in, _ = self.record(li, moe, orig, True, moe_input=True)
        outs: list[dict[int, torch.Tensor]] = [{} for _ in orig]
        for e in range(len(moe.experts)):
            if any(e in r for r in rows):
                expert = self.sm.load_expert(li, e)
                for b, r in enumerate(rows):
                    if e in r:
                        outs[b][e] = self.spill.keep(expert(r[e]))
                self.sm.free_expert(li, e)
        return self.replay(li, moe, orig, outs), moe_in

    def moe_layer(self, li: int, moe: nn.Module, names: list[str], inputs: list[tuple],
                  orig: list[tuple] | None) -> tuple[list[tuple], list[tuple] | None]:
        """See the module docstring: record, experts one at a time, replay. Returns as ``dense_layer``."""
        shared = [n for n in names if self.expert_of[n] is None]
        orig_out, moe_in = self.original_moe(li, moe, orig) if self.pair else (None, [])
        # original weights: stats of the non-expert linears, each expert's routed rows
        rows1, whole1, idx1 = self.stats_then_quantize(shared, lambda first: self.record(li, moe, inputs, first),
                                                       lambda: self.record(li, moe, orig, False),
                                                       count=self.stage_of is None)
        # the quantized attention's outputs feed the experts (and with ``sequential`` give their statistics)
        srows, sidx, swhole, rows2 = rows1, idx1, whole1, rows1
        if self.requant:
            self.counting = self.stage_of is not None
            try:
                rows2, whole2, idx2 = self.record(li, moe, inputs, True)
            finally:
                self.counting = False
            if self.stage_of is not None:
                srows, sidx, swhole = rows2, idx2, whole2
        outs: list[dict[int, torch.Tensor]] = [{} for _ in inputs]
        by_expert: dict[int, list[str]] = {}
        for n in names:
            if self.expert_of[n] is not None:
                by_expert.setdefault(self.expert_of[n], []).append(n)
        for e in range(len(moe.experts)):
            mine = by_expert.get(e, [])
            if not mine and not any(e in r for r in rows1 + rows2):
                continue                                # neither a target nor called: never loaded
            expert = self.sm.load_expert(li, e)
            for part in self.stages(mine):
                self.start(part)
                self.active = set(part)
                if self.pair and part:      # the original model's expert inputs of the tokens routed here
                    self.capture(lambda: [expert(moe_in[b][(sidx[b] == e).any(-1).nonzero()[:, 0]])
                                          for b, r in enumerate(srows) if e in r])
                if swhole and part:
                    self.broadcast = True
                    try:
                        for x in swhole:
                            expert(x)
                    finally:
                        self.broadcast = False
                for b, r in enumerate(srows):
                    if e in r:
                        y = expert(r[e])
                        if not self.requant:
                            outs[b][e] = self.spill.keep(y)
                self.active = set()
                self.paired()
                if self.requant:
                    self.replace({n: self.quantized(n) for n in part})
                self.finish(part)
            if self.requant:
                for b, r in enumerate(rows2):
                    if e in r:
                        outs[b][e] = self.spill.keep(expert(r[e]))
            for n in mine:
                self.originals.pop(n, None)
            self.sm.free_expert(li, e)
        self.originals = {}
        return self.replay(li, moe, inputs, outs), orig_out


def collect_stats(ckpt, data: CalibData, targets: list[str], *, quantize: Quantizer | None = None,
                  groups: dict[str, list[str]] | None = None, propagate: bool = True, all_experts: bool = False,
                  batch: int = 4, progress: bool = False, sink: Callable[[str, LinearStats], None] | None = None,
                  spill_dir=None, spill_bytes: int = SPILL_BYTES, stats_bytes: int = STATS_BYTES,
                  embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  target_original: bool = False, sequential: bool = False) -> Collected:
    """Statistics for the linears ``targets`` (checkpoint names); see the module docstring.

    ``quantize(name, w, stats, group_amax)`` returns the dequantized quantized weight of ``name`` (called in
    layer order when ``propagate``); ``group_amax`` is ``max|w|`` over ``groups[name]`` (fused partners sharing
    one NVFP4 global scale; default: the tensor alone), taken before any of them is replaced. Linears the
    forward never calls (MTP blocks, absorbed MLA ``kv_b_proj``) get no stats. ``sink(name, stats)``: receives
    each linear's finished stats (count > 0) instead of the returned dict. ``spill_dir`` / ``spill_bytes``:
    where and above what size (bytes of one layer's hidden states, or of its recorded expert rows) they go to
    a memory-mapped temporary file (default dir: the system's). ``embed(ids [B, T]) -> [B, T, D]``: replaces
    the checkpoint's embedding (benchmarks on a ``synth --layers N`` checkpoint, which has none; the pass then
    starts at the first layer present). ``stats_bytes``: float64 ``X^T X`` held at once for a block's
    non-expert linears; more need extra (identical) runs of the block, a few per layer at full size.
    ``target_original``: also ``LinearStats.xc`` from the paired original stream (module docstring; needs
    ``propagate`` and a ``quantize``, else there is one stream and nothing to pair). ``sequential``: true-sequential
    stages inside each block (module docstring; without ``propagate`` no weight is replaced: one stage).
    """
    from tqdm import tqdm

    W, L = data.windows.shape
    with Checkpoint.open(ckpt) as ck, Spill(spill_dir, spill_bytes) as spill:
        sm = StreamedModel(ck, max_seq_len=L, max_batch_size=min(batch, W), embed=embed)
        layer_of = {n: ck.tensor_info(n).layer for n in targets}
        expert_of = {n: ck.tensor_info(n).expert for n in targets}
        p = _Pass(sm, targets, layer_of, expert_of, quantize=quantize, groups=groups, propagate=propagate,
                  all_experts=all_experts, sink=sink, spill=spill, stats_bytes=stats_bytes,
                  target_original=target_original,
                  stage_of={n: SEQUENTIAL_STAGES.get(ck.tensor_info(n).role, 0) for n in targets} if sequential else None)
        handles = p.hooks()
        try:
            main = [li for li in sm.main_layers if any(layer_of[n] == li for n in targets)]
            run = [li for li in sm.main_layers if main and li <= main[-1]]
            with torch.inference_mode():
                inputs = sm.capture(data.windows, batch, spill) if run else []
                orig = inputs if p.pair else None        # the original model's stream (same block-0 inputs)
                for li in tqdm(run, desc="calibrate", unit="layer", disable=not progress):
                    names = [n for n in targets if layer_of[n] == li]
                    moe = _moe(sm.blocks[li])
                    sm.load_layer(li, experts=moe is None)
                    spill.new_layer()
                    if moe is None:
                        inputs, orig = p.dense_layer(li, names, inputs, orig)
                    else:
                        hd = moe.gate.register_forward_hook(p.count_hook(li, len(moe.experts)))
                        try:
                            inputs, orig = p.moe_layer(li, moe, names, inputs, orig)
                        finally:
                            hd.remove()
                    sm.free_layer(li)
        finally:
            for hd in handles:
                hd.remove()
    return Collected(p.kept, p.coverage, W * L)
