"""The streamed statistics pass (calib/collect.py) against the whole-model pass it replaced, bit for bit, and
its memory bound on a mid-size synthetic model (peak RSS of a fresh interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from torch import nn

from v4convert.calib.collect import Collected, collect_stats
from v4convert.calib.linstats import LinearStats
from v4convert.calib.data import calibration_windows
from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Family

from .calib_common import linears


class _Stop(Exception):
    pass


def _rename(family: Family) -> Callable[[str], str]:
    if family is Family.V4:
        from v4convert.runtime.deepseek_v4 import model_name
        return model_name
    return lambda n: n


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.layers


def _reference(ckpt, data, targets: list[str], *,
                  quantize: Callable[[str, torch.Tensor, LinearStats | None, torch.Tensor], torch.Tensor] | None = None,
                  groups: dict[str, list[str]] | None = None,
                  propagate: bool = True, all_experts: bool = False, batch: int = 4,
                  ) -> Collected:
    """The whole-model pass this module replaced (v4convert before streaming), kept as the reference."""
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
        for li in range(layers[-1] + 1 if layers else 0):
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


def _gptq_nvfp4(calls: list | None = None):
    """The propagation quantizer `quantize --calib --method gptq` uses (NVFP4, fused groups' global amax)."""
    from v4convert.calib.method import MethodSpec, quantize_weight
    from v4convert.formats.fp4_grid import FP4Codec
    spec = MethodSpec.parse("gptq")

    def quantize(name, w, stats, gamax):
        if calls is not None:
            calls.append(name)
        h = stats.hessian() if stats is not None else None
        return quantize_weight(spec, FP4Codec.NVFP4, w.float(), h, global_amax=gamax, name=name).dequantize()
    return quantize


def _groups(names: list[str]) -> dict[str, list[str]]:
    """gate/up of one expert (or shared expert / dense MLP) share a global scale, as the plan's units do."""
    out: dict[str, list[str]] = {}
    for n in names:
        for a, b in (("gate_proj", "up_proj"), (".w1.", ".w3.")):
            if a in n and n.replace(a, b) in names:
                out[n] = out[n.replace(a, b)] = [n, n.replace(a, b)]
    return out


def _same(a: Collected, b: Collected) -> None:
    assert a.coverage == b.coverage and a.tokens == b.tokens
    assert set(a.stats) == set(b.stats) and a.stats
    for n, s in a.stats.items():
        r = b.stats[n]
        assert s.count == r.count and s.amax == r.amax, n
        assert torch.equal(s.xtx, r.xtx), n


@pytest.mark.parametrize("preset", ["v3-tiny", "v32-tiny", "v4-flash-tiny"])
def test_stream_equals_whole_model_bit_for_bit(tiny_ckpts, calib_txt, preset):
    """Propagated GPTQ pass: every linear's X^T X, amax and count, and the coverage, equal the whole-model
    pass exactly; spilling every hidden state / expert row to the memory-mapped file and collecting one linear
    per block run (``stats_bytes=0``) change nothing."""
    ck = tiny_ckpts[preset]
    data = calibration_windows(ck, calib_txt, n_tokens=192, seq_len=64)
    names = linears(ck)
    groups = _groups(names)
    calls: list[str] = []
    ref = _reference(ck, data, names, quantize=_gptq_nvfp4(), groups=groups, batch=2)
    got = collect_stats(ck, data, names, quantize=_gptq_nvfp4(calls), groups=groups, batch=2)
    _same(got, ref)
    with Checkpoint.open(ck) as c:
        run = {n for n in names if c.tensor_info(n).layer < c.arch.n_layers and not c.tensor_info(n).mtp}
    assert sorted(calls) == sorted(run)                  # every main-layer target quantized exactly once
    spilled = collect_stats(ck, data, names, quantize=_gptq_nvfp4(), groups=groups, batch=2, spill_bytes=0,
                            stats_bytes=0, spill_dir=ck.parent)
    _same(spilled, ref)
    assert not [p for p in ck.parent.iterdir() if p.name.startswith("v4convert-calib-")]


@pytest.mark.parametrize("preset", ["v3-tiny", "v4-flash-tiny"])
def test_stream_original_and_all_experts_bit_for_bit(tiny_ckpts, calib_txt, preset):
    ck = tiny_ckpts[preset]
    data = calibration_windows(ck, calib_txt, n_tokens=192, seq_len=64)
    names = linears(ck)
    for kw in ({"propagate": False}, {"all_experts": True, "quantize": _gptq_nvfp4()}):
        _same(collect_stats(ck, data, names, batch=2, **kw), _reference(ck, data, names, batch=2, **kw))


def test_sink_receives_stats_instead_of_the_result(tiny_ckpts, calib_txt):
    ck = tiny_ckpts["v3-tiny"]
    data = calibration_windows(ck, calib_txt, n_tokens=128, seq_len=64)
    names = linears(ck)
    got: dict[str, LinearStats] = {}
    col = collect_stats(ck, data, names, propagate=False, sink=got.__setitem__)
    assert not col.stats and col.coverage
    _same(Collected(got, col.coverage, col.tokens), collect_stats(ck, data, names, propagate=False))


MID = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, num_hidden_layers=6,
           first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
           kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=64,
           n_group=4, topk_group=2, num_experts_per_tok=4, vocab_size=611, num_nextn_predict_layers=0)

_PEAK = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from v4convert.calib.collect import collect_stats
from v4convert.calib.data import calibration_windows
from v4convert.calib.method import MethodSpec, quantize_weight
from v4convert.formats.fp4_grid import FP4Codec
ck, txt, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = calibration_windows(ck, txt, n_tokens=256, seq_len=64)
q = lambda n, w, s, g: quantize_weight(MethodSpec.parse("rtn"), FP4Codec.NVFP4, w.float(), None,
                                       global_amax=g).dequantize()
with torch.device("meta"):     # one-time cost of the first meta-device init (torch's meta kernels): ~150 MB
    torch.nn.Embedding(2, 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seen = []
collect_stats(ck, data, names, quantize=q, sink=lambda n, s: seen.append(n))
print(json.dumps({"before": before, "after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seen": len(seen)}))
"""


def test_peak_memory_is_one_layer_not_the_model(tmp_path, calib_txt, monkeypatch):
    """A 6-layer, 64-expert synthetic V3 (float32: ~1.2 GB of weights, ~200 MB of experts per MoE layer): the
    streamed pass raises a fresh interpreter's peak RSS by less than one MoE layer's float32 experts."""
    from v4convert import synth as synth_mod
    from v4convert.synth import preset_config

    cfg = dict(preset_config("v3-tiny"), **MID)
    monkeypatch.setitem(synth_mod.PRESETS, "v3-mid-test", (lambda: json.loads(json.dumps(cfg)), 64 << 20))
    ck = synth_mod.synth("v3-mid-test", tmp_path / "mid").out
    with Checkpoint.open(ck) as c:
        infos = list(c.infos())
        f32 = sum(4 * i.numel for i in infos)
        layer_experts = sum(4 * i.numel for i in infos if i.layer == 1 and i.expert is not None)
    names = linears(ck)
    assert f32 > 5 * layer_experts > 5 * (150 << 20)
    r = subprocess.run([sys.executable, "-c", _PEAK, str(ck), str(calib_txt), json.dumps(names)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    delta = (out["after"] - out["before"]) * 1024            # ru_maxrss is in KiB on Linux
    assert out["seen"] > 0
    assert delta < layer_experts, f"peak RSS grew by {delta / 2**20:.0f} MiB (one layer's experts: " \
                                  f"{layer_experts / 2**20:.0f} MiB, model {f32 / 2**20:.0f} MiB)"


def test_hessian_in_row_blocks_is_the_same_bits():
    for k in (5, 160, 3000):
        s = LinearStats(torch.zeros(k, k, dtype=torch.float64))
        for i in range(3):
            s.add(torch.randn(37, k, generator=torch.Generator().manual_seed(i)) * 3)
        assert torch.equal(s.hessian().view(torch.int32), (s.xtx / s.count).float().view(torch.int32))
