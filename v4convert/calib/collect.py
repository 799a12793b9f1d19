"""Layer-sequential statistics pass through the runtime's own block code (V3/V3.1, V3.2, V4).

For every linear about to be quantized we collect, from its inputs ``x [n, K]`` on the calibration windows:

* ``h``: ``X^T X / n`` (float32 ``[K, K]``, accumulated in float64) — GPTQ's Hessian; its diagonal is the
  per-input-channel mean of ``x^2`` the activation-weighted search uses;
* ``amax``: ``max |x|`` (static per-tensor activation scale for W4A4);
* ``count``: rows seen (for a routed expert: the tokens routed to it = its coverage).

Order: the windows are embedded by the model's own forward, which is stopped at block 0 to capture that
block's call arguments (hidden state + what every block of the family receives: positions, rope, mask, ids).
Then for layer L = 0, 1, ...: block L runs on the saved hidden states (its linears' stats are recorded),
``quantize(name, w, stats, group_amax)`` replaces L's weights by their dequantized quantized values, and
(``propagate=True``, the default) block L runs again so layer L+1 sees the *quantized* layer's outputs;
``propagate=False`` feeds L+1 the original outputs. Because the runtime itself runs the blocks, every
family works unchanged (MLA/indexer, hyper-connections, hash routing). Deviations from the issue's design
(in the report): the whole runtime model is loaded (fine for tiny and mid-size models, not the 671B RSS
bound), and hidden states stay in RAM (``W x L x D`` floats; no memory-mapped file yet).

``all_experts``: every calibration token also goes through every routed expert for *statistics only*
(the layer output still uses the real routing); coverage counts stay the routed counts.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Family

from .data import CalibData


@dataclass
class LinearStats:
    xtx: torch.Tensor                 # float64 [K, K], sum of x x^T
    amax: float = 0.0
    count: int = 0

    def hessian(self) -> torch.Tensor:
        """float32 ``[K, K]``: ``X^T X / n`` (zeros when nothing was seen)."""
        return (self.xtx / max(self.count, 1)).float()

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.xtx += (x.T @ x).double()      # float32 per batch, float64 across batches
        self.amax = max(self.amax, float(x.abs().max()))
        self.count += x.shape[0]


@dataclass
class Collected:
    stats: dict[str, LinearStats]                     # checkpoint tensor name -> stats
    coverage: dict[int, list[int]] = field(default_factory=dict)   # MoE layer -> routed tokens per expert
    tokens: int = 0                                   # calibration tokens


class _Stop(Exception):
    """Raised after the block being calibrated, to skip the rest of the forward."""




def _rename(family: Family) -> Callable[[str], str]:
    if family is Family.V4:
        from v4convert.runtime.deepseek_v4 import model_name
        return model_name
    return lambda n: n


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.layers


def collect_stats(ckpt, data: CalibData, targets: list[str], *,
                  quantize: Callable[[str, torch.Tensor, LinearStats | None, torch.Tensor], torch.Tensor] | None = None,
                  groups: dict[str, list[str]] | None = None,
                  propagate: bool = True, all_experts: bool = False, batch: int = 4,
                  progress: bool = False) -> Collected:
    """Statistics for the linears ``targets`` (checkpoint names); see the module docstring.

    ``quantize(name, w, stats, group_amax)`` returns the dequantized quantized weight of ``name`` (called in
    layer order when ``propagate``); ``group_amax`` is ``max|w|`` over ``groups[name]`` (fused partners sharing
    one NVFP4 global scale; default: the tensor alone), taken before any of them is replaced. Linears the forward never calls (MTP blocks, absorbed MLA ``kv_b_proj``) get no stats.
    """
    from tqdm import tqdm

    from v4convert.runtime import load
    from v4convert.runtime.common import Linear

    with Checkpoint.open(ckpt) as ck:
        family = ck.family
        layer_of = {n: ck.tensor_info(n).layer for n in targets}
        expert_of = {n: ck.tensor_info(n).expert for n in targets}
    W, L = data.windows.shape
    model = load(ckpt, dtype=torch.float32, max_seq_len=L, max_batch_size=min(batch, W))
    rename = _rename(family)
    mods: dict[str, Linear] = {}
    for n in targets:
        m = model.get_submodule(rename(n)[: -len(".weight")])
        if not isinstance(m, Linear):
            raise TypeError(f"{n}: runtime module {type(m).__name__} is not a Linear")
        mods[n] = m
    blocks = _blocks(model)
    n_main = len(blocks) if not hasattr(model, "args") else model.args.arch.n_layers
    stats = {n: LinearStats(torch.zeros(m.in_features, m.in_features, dtype=torch.float64)) for n, m in mods.items()}
    coverage: dict[int, list[int]] = {}
    state = {"active": set(), "broadcast": False}

    def lin_hook(name):
        def hook(mod, args):
            if name in state["active"] and (not state["broadcast_only"].get(name) or state["broadcast"]):
                stats[name].add(args[0])
        return hook

    # experts whose stats come only from the broadcast pass (all_experts)
    state["broadcast_only"] = {n: all_experts and expert_of[n] is not None for n in targets}
    handles = [m.register_forward_pre_hook(lin_hook(n)) for n, m in mods.items()]

    def count_hook(layer: int, n_exp: int):
        def hook(mod, args, out):
            if layer in state["layers"]:
                idx = out[1].reshape(-1)
                c = torch.bincount(idx[idx >= 0], minlength=n_exp).tolist()
                coverage[layer] = [a + b for a, b in zip(coverage.get(layer, [0] * n_exp), c)]
        return hook

    def broadcast_hook(moe):
        def hook(mod, args):
            if not any(state["active"] & set(_expert_names(moe))):
                return
            x = args[0].reshape(-1, args[0].shape[-1])
            state["broadcast"] = True
            try:
                for e in moe.experts:
                    e(x)
            finally:
                state["broadcast"] = False
        return hook

    expert_names_by_moe: dict[int, list[str]] = defaultdict(list)
    moes = {}
    for li in range(n_main):
        blk = blocks[li]
        moe = getattr(blk, "mlp", None) or getattr(blk, "ffn", None)
        if moe is not None and hasattr(moe, "experts"):
            moes[li] = moe
            handles.append(moe.gate.register_forward_hook(count_hook(li, len(moe.experts))))
    for n in targets:
        if expert_of[n] is not None and layer_of[n] in moes:
            expert_names_by_moe[id(moes[layer_of[n]])].append(n)

    def _expert_names(moe):
        return expert_names_by_moe.get(id(moe), [])

    if all_experts:
        handles += [moe.register_forward_pre_hook(broadcast_hook(moe)) for moe in moes.values()]

    def block_inputs() -> list[tuple]:
        """Arguments of block 0's call for each batch of windows (hidden state first; the rest — positions,
        rope tables, mask, token ids — is what every block of this family receives)."""
        got: list[tuple] = []

        def grab(mod, args):
            got.append(args)
            raise _Stop

        hd = blocks[0].register_forward_pre_hook(grab)
        try:
            for i in range(0, W, batch):
                try:
                    model(data.windows[i:i + batch])
                except _Stop:
                    pass
        finally:
            hd.remove()
        return got

    def run_block(li: int, inputs: list[tuple]) -> list[tuple]:
        with torch.inference_mode():
            return [(blocks[li](*args),) + tuple(args[1:]) for args in inputs]

    try:
        layers = sorted({layer_of[n] for n in targets if layer_of[n] is not None and layer_of[n] < n_main})
        inputs = block_inputs()
        for li in tqdm(range(layers[-1] + 1 if layers else 0), desc="calibrate", unit="layer", disable=not progress):
            names = [n for n in targets if layer_of[n] == li]
            state["active"], state["layers"] = set(names), {li}
            outputs = run_block(li, inputs)
            state["active"], state["layers"] = set(), set()
            if propagate and quantize is not None and names:
                amax = {n: mods[n].weight.detach().abs().amax().float() for n in names}
                for n in names:
                    partners = (groups or {}).get(n, [n])
                    g = torch.stack([amax[p] if p in amax else mods[p].weight.detach().abs().amax().float()
                                     for p in partners]).amax()
                    w = quantize(n, mods[n].weight.data, stats[n] if stats[n].count else None, g)
                    mods[n].weight.data.copy_(w.to(mods[n].weight.dtype))
                outputs = run_block(li, inputs)          # the next layer sees the quantized layer's output
            inputs = outputs
    finally:
        for hd in handles:
            hd.remove()
    out = {n: s for n, s in stats.items() if s.count}
    return Collected(out, coverage, W * L)
