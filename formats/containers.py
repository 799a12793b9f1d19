"""Output containers for FP4 checkpoints: stored tensor names, dtypes, and quantization configs.

Three containers (DESIGN §5), one naming table each:

* ``COMPRESSED_TENSORS`` (vLLM/SGLang/transformers ``quant_method: compressed-tensors``):
  NVFP4 ``weight_packed`` U8 ``[N,K/2]``, ``weight_scale`` F8_E4M3 ``[N,K/16]``,
  ``weight_global_scale`` F32 ``[1]`` (= 448*6/amax, a divisor); MXFP4 ``weight_packed`` U8 +
  ``weight_scale`` U8 (E8M0 exponent bytes) ``[N,K/32]``; kept FP8 blocks ``weight`` F8_E4M3 +
  ``weight_scale`` F32 ``[B(N),B(K)]`` (a multiplier; DeepSeek's ``weight_scale_inv`` is one too).
* ``MODELOPT`` (NVIDIA ModelOpt, ``hf_quant_config.json``): NVFP4 ``weight`` U8, ``weight_scale``
  F8_E4M3, ``weight_scale_2`` F32 scalar (= amax/(6*448), a multiplier). Layers ModelOpt keeps are
  BF16 (as in NVIDIA's DeepSeek-R1-FP4): kept FP8 blocks are dequantized to BF16.
* ``DEEPSEEK`` (V4 native): MXFP4 ``weight`` I8 + ``scale`` F8_E8M0; kept tensors verbatim.

This module knows nothing of model roles: callers pass module names grouped by scheme.
"""
from __future__ import annotations

import enum
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable
from v4convert.errors import UserError

from .blocks import FP8_BLOCK, NVFP4_BLOCK as NVFP4_GROUP  # noqa: F401 (re-exported)
from .blocks import MXFP4_BLOCK as MXFP4_GROUP  # noqa: F401
PRODUCER = "v4convert"


class ContainerError(UserError):
    """A tensor kind a container cannot hold; the message names the tensor."""


class Container(enum.Enum):
    COMPRESSED_TENSORS = "compressed-tensors"
    MODELOPT = "modelopt"
    DEEPSEEK = "deepseek"


class OutKind(enum.Enum):
    """What one output linear (or plain tensor) is stored as."""
    PLAIN = "plain"            # as the source dtype (norms, embeddings, BF16 linears)
    FP8_BLOCK = "fp8_block"    # E4M3 + 128x128 block scale
    BF16 = "bf16"              # a kept FP8 block linear dequantized to BF16 (ModelOpt)
    NVFP4 = "nvfp4"
    MXFP4 = "mxfp4"


class Part(enum.Enum):
    """Which component of a logical tensor an output entry holds (the producer fills it)."""
    WEIGHT = "weight"
    SCALE = "scale"
    GLOBAL_SCALE = "global_scale"
    INPUT_SCALE = "input_scale"      # W4A4 static activation scale (c-t input_global_scale / ModelOpt input_scale)


@dataclass(frozen=True)
class Entry:
    """One safetensors entry to write."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    part: Part


def _stem(name: str) -> str:
    if not name.endswith(".weight"):
        raise ContainerError(f"tensor {name}: a quantized linear's name must end in '.weight'")
    return name[: -len(".weight")]


def entries(container: Container, kind: OutKind, name: str, shape: tuple[int, ...], *,
            plain_dtype: str = "BF16", src_scale: tuple[str, str] | None = None,
            input_scale: bool = False) -> list[Entry]:
    """Output entries of logical tensor ``name`` (logical ``shape``) stored as ``kind``.

    ``plain_dtype``: dtype of a PLAIN tensor. ``src_scale``: (stored name, dtype) of the source
    FP8 block scale, which the DeepSeek container keeps verbatim. ``input_scale`` (NVFP4 W4A4): add the
    static activation scale, c-t ``input_global_scale`` F32 ``[1]`` (= 448*6/act_amax, a divisor) or ModelOpt
    ``input_scale`` F32 scalar (= act_amax/(6*448), a multiplier), as vLLM's W4A4 NVFP4 methods load them.
    """
    if kind is OutKind.PLAIN:
        return [Entry(name, plain_dtype, shape, Part.WEIGHT)]
    if kind is OutKind.BF16:
        return [Entry(name, "BF16", shape, Part.WEIGHT)]
    n, k = shape
    stem = _stem(name)
    bs = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    if kind is OutKind.FP8_BLOCK:
        if container is Container.COMPRESSED_TENSORS:
            return [Entry(name, "F8_E4M3", shape, Part.WEIGHT), Entry(stem + ".weight_scale", "F32", bs, Part.SCALE)]
        if container is Container.DEEPSEEK:
            if src_scale is None:
                raise ContainerError(f"tensor {name}: DeepSeek container keeps FP8 scales verbatim; source scale unknown")
            return [Entry(name, "F8_E4M3", shape, Part.WEIGHT), Entry(src_scale[0], src_scale[1], bs, Part.SCALE)]
        raise ContainerError(f"tensor {name}: ModelOpt keeps unquantized layers in BF16, not FP8 blocks")
    if kind is OutKind.NVFP4:
        if container is Container.COMPRESSED_TENSORS:
            return [Entry(stem + ".weight_packed", "U8", (n, k // 2), Part.WEIGHT),
                    Entry(stem + ".weight_scale", "F8_E4M3", (n, k // NVFP4_GROUP), Part.SCALE),
                    Entry(stem + ".weight_global_scale", "F32", (1,), Part.GLOBAL_SCALE)] \
                + ([Entry(stem + ".input_global_scale", "F32", (1,), Part.INPUT_SCALE)] if input_scale else [])
        if container is Container.MODELOPT:
            return [Entry(name, "U8", (n, k // 2), Part.WEIGHT),
                    Entry(stem + ".weight_scale", "F8_E4M3", (n, k // NVFP4_GROUP), Part.SCALE),
                    Entry(stem + ".weight_scale_2", "F32", (), Part.GLOBAL_SCALE)] \
                + ([Entry(stem + ".input_scale", "F32", (), Part.INPUT_SCALE)] if input_scale else [])
        raise ContainerError(f"tensor {name}: the DeepSeek container holds MXFP4 only (use --format "
                             f"compressed-tensors or modelopt for NVFP4)")
    if kind is OutKind.MXFP4:
        if container is Container.COMPRESSED_TENSORS:
            return [Entry(stem + ".weight_packed", "U8", (n, k // 2), Part.WEIGHT),
                    Entry(stem + ".weight_scale", "U8", (n, k // MXFP4_GROUP), Part.SCALE)]
        if container is Container.DEEPSEEK:
            return [Entry(name, "I8", (n, k // 2), Part.WEIGHT),
                    Entry(stem + ".scale", "F8_E8M0", (n, k // MXFP4_GROUP), Part.SCALE)]
        raise ContainerError(f"tensor {name}: ModelOpt NVFP4 checkpoints cannot hold MXFP4 tensors "
                             f"(use --format compressed-tensors or deepseek)")
    raise ContainerError(f"tensor {name}: unknown output kind {kind}")


# ---------------------------------------------------------------------------------------------
# Compact module-name patterns (configs list thousands of expert modules)
# ---------------------------------------------------------------------------------------------
_NUM = re.compile(r"\d+")


def _templates(modules: Iterable[str]) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Split names into (literal pieces) -> set of (number tuples)."""
    out: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
    for m in modules:
        out[tuple(_NUM.split(m))].add(tuple(_NUM.findall(m)))
    return out


def compact_regexes(modules: Iterable[str], all_modules: Iterable[str]) -> list[str]:
    """Anchored regexes (``re:`` prefix, compressed-tensors style) matching exactly ``modules``.

    Numbers in a name (layer, expert) are collapsed to ``\\d+`` where every name of ``all_modules``
    with that template is selected; otherwise the selected layer numbers are listed.
    """
    sel = _templates(modules)
    every = _templates(all_modules)
    pats: list[str] = []
    for pieces, nums in sorted(sel.items()):
        full = every.get(pieces, set())
        if nums == full:
            body = r"\d+".join(re.escape(p) for p in pieces)
            pats.append(f"re:^{body}$")
            continue
        # group by first number (layer): list layers whose selected set equals the full one
        by_first: dict[str, set] = defaultdict(set)
        full_first: dict[str, set] = defaultdict(set)
        for t in nums:
            by_first[t[:1]].add(t)
        for t in full:
            full_first[t[:1]].add(t)
        whole = sorted((f for f in by_first if by_first[f] == full_first[f]), key=lambda f: int(f[0]) if f else -1)
        if whole and len(pieces) > 1:
            rest = r"\d+".join(re.escape(p) for p in pieces[1:])
            alt = "|".join(f[0] for f in whole)
            pats.append(f"re:^{re.escape(pieces[0])}(?:{alt}){rest}$")
        for f in by_first:
            if f in whole and len(pieces) > 1:
                continue
            for t in sorted(by_first[f]):
                name = pieces[0] + "".join(n + p for n, p in zip(t, pieces[1:]))
                pats.append(f"re:^{re.escape(name)}$")
    return pats


def regex_to_globs(pattern: str) -> list[str]:
    """One of :func:`compact_regexes`' patterns as ModelOpt-style ``fnmatch`` globs (alternations expanded)."""
    body = pattern[len("re:^"):-1]
    m = re.fullmatch(r"(.*?)\(\?:([0-9|]+)\)(.*)", body)
    bodies = [m.group(1) + alt + m.group(3) for alt in m.group(2).split("|")] if m else [body]
    return [b.replace(r"\d+", "*").replace("\\", "") for b in bodies]


# ---------------------------------------------------------------------------------------------
# Config writers
# ---------------------------------------------------------------------------------------------
def _nvfp4_weights() -> dict:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
            "group_size": NVFP4_GROUP, "dynamic": False, "actorder": None, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def _mxfp4_weights() -> dict:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
            "group_size": MXFP4_GROUP, "dynamic": False, "actorder": None, "block_structure": None,
            "scale_dtype": "torch.uint8", "observer": "minmax", "observer_kwargs": {}}


# W4A4 input_activations, exactly compressed-tensors' presets (quant_scheme.PRESET_SCHEMES "NVFP4" / "MXFP4"):
# NVFP4: static per-tensor global scale (the ``input_global_scale`` tensor) + E4M3 scales per 16 computed on the
# fly ("local"); MXFP4: fully dynamic E8M0 scales per 32 (no tensor). tests/test_w4a4.py checks both against the
# installed library's presets.
def _nvfp4_input_activations() -> dict:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
            "group_size": NVFP4_GROUP, "dynamic": "local", "actorder": None, "block_structure": None,
            "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax", "observer_kwargs": {}}


def _mxfp4_input_activations() -> dict:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": MXFP4_GROUP,
            "dynamic": True, "actorder": None, "block_structure": None, "scale_dtype": "torch.uint8",
            "zp_dtype": "torch.uint8", "observer": None, "observer_kwargs": {}}


ACTIVATIONS = ("w4a16", "w4a4")


def _fp8_block_scheme() -> tuple[dict, dict]:
    w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "group_size": None,
         "block_structure": [FP8_BLOCK, FP8_BLOCK], "dynamic": False, "actorder": None,
         "observer": "minmax", "observer_kwargs": {}}
    a = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": FP8_BLOCK,
         "dynamic": True, "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {}}
    return w, a


_CT_FORMAT = {OutKind.NVFP4: "nvfp4-pack-quantized", OutKind.MXFP4: "mxfp4-pack-quantized",
              OutKind.FP8_BLOCK: "float-quantized"}


# ---------------------------------------------------------------------------------------------
# Fused modules of the serving engine (vLLM 0.32 deepseek_v2.py: packed_modules_mapping, FusedMoE)
# ---------------------------------------------------------------------------------------------
# fused module (dotted suffix, replacing the members' own suffix) -> member suffixes in the checkpoint.
# vLLM builds one linear per fused module, so its members must share one storage kind, and it matches
# ModelOpt exclusions against the fused module's name (``fnmatch``), not the members'.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "self_attn.fused_qkv_a_proj": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),  # q_lora_rank set
    "gate_up_proj": ("gate_proj", "up_proj"),            # mlp. and mlp.shared_experts.
}
# (V3.2's indexer.wk + indexer.weights_proj are fused too, but unquantized: vLLM upcasts an FP8 wk at load.)
# Routed experts: one FusedMoE module per layer, ``PREFIX.mlp.experts`` (all experts, all projections).
_EXPERT = re.compile(r"^(?P<moe>.*\.mlp\.experts)\.\d+\.(?:gate|up|down)_proj$")


def fused_modules(modules: Iterable[str]) -> dict[str, list[str]]:
    """Fused module name -> the given member modules it runs (only groups with a member present)."""
    out: dict[str, list[str]] = defaultdict(list)
    for m in modules:
        e = _EXPERT.match(m)
        if e:
            out[e.group("moe")].append(m)
            continue
        for fused, members in FUSED_LINEARS.items():
            for member in members:
                if m.endswith("." + member):
                    out[m[: -len(member)] + fused].append(m)
    return dict(out)


def check_fused(kind_of: dict[str, OutKind]) -> None:
    """Raise if the members of one fused module are stored as different kinds (vLLM cannot load that).

    ``kind_of``: every linear module -> its output kind (BF16 and PLAIN count as one: unquantized).
    """
    def k(m: str) -> OutKind:
        return OutKind.PLAIN if kind_of[m] is OutKind.BF16 else kind_of[m]

    for fused, members in sorted(fused_modules(kind_of).items()):
        kinds = sorted({k(m).value for m in members})
        if len(kinds) > 1:
            first = {v: next(m for m in members if k(m).value == v) for v in kinds}
            raise ContainerError(
                f"tensor {first[kinds[0]]}.weight: vLLM runs {fused} as one module, but its members are stored as "
                + " and ".join(f"{v} ({first[v]})" for v in kinds)
                + "; give them one codec (extend the --keep / --override pattern to all of them)")


def _fused_exclusions(exclude: list[str], all_modules: list[str]) -> list[str]:
    """Fused modules whose members (as present in ``all_modules``) are all excluded."""
    ex = set(exclude)
    return [f for f, ms in fused_modules(all_modules).items() if all(m in ex for m in ms)]


# ---------------------------------------------------------------------------------------------
# One table per container: the quantization_config keys as each consumer reads them
# ---------------------------------------------------------------------------------------------
def _producer(version: str) -> dict:
    # vLLM 0.32 reads ``producer`` as a dict (``.get("name")``) in both containers.
    return {"name": PRODUCER, "version": version}


def compressed_tensors_config(groups: dict[OutKind, list[str]], ignore: list[str], all_modules: list[str],
                              version: str, *, activations: str = "w4a16") -> dict:
    """``quantization_config`` for config.json: one config group per quantized module set.

    ``groups``: kind -> module names (tensor names without ``.weight``); ``ignore``: linear modules
    left unquantized (BF16); ``all_modules``: every linear module (for compact patterns).
    Weight-only (W4A16 / W8A8-dynamic for FP8 blocks): FP4 groups have ``input_activations: None``;
    ``activations="w4a4"``: FP4 groups get the NVFP4 / MXFP4 preset's ``input_activations``.
    """
    if activations not in ACTIVATIONS:
        raise ContainerError(f"activations {activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    a4 = activations == "w4a4"
    config_groups: dict[str, dict] = {}
    used = [k for k in (OutKind.NVFP4, OutKind.MXFP4, OutKind.FP8_BLOCK) if groups.get(k)]
    for i, kind in enumerate(used):
        targets = compact_regexes(groups[kind], all_modules)
        if kind is OutKind.NVFP4:
            g = {"targets": targets, "weights": _nvfp4_weights(),
                 "input_activations": _nvfp4_input_activations() if a4 else None}
        elif kind is OutKind.MXFP4:
            g = {"targets": targets, "weights": _mxfp4_weights(),
                 "input_activations": _mxfp4_input_activations() if a4 else None}
        else:
            w, a = _fp8_block_scheme()
            g = {"targets": targets, "weights": w, "input_activations": a}
        g.update(output_activations=None, format=_CT_FORMAT[kind])
        config_groups[f"group_{i}"] = g
    fmt = _CT_FORMAT[used[0]] if len(used) == 1 else "mixed-precision"
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": compact_regexes(ignore, all_modules) if ignore else [],
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "producer": _producer(version)}


# ModelOpt quant_algo per activation scheme, as vLLM 0.32 spells it (modelopt.py LINEAR_ALGOS):
# "NVFP4" is W4A4 (it then reads a static ``input_scale`` per linear); weight-only is "W4A16_NVFP4".
MODELOPT_ALGO = {"w4a16": "W4A16_NVFP4", "w4a4": "NVFP4"}


def modelopt_configs(exclude: list[str], all_modules: list[str], version: str, *,
                     activations: str = "w4a16") -> tuple[dict, dict]:
    """(``hf_quant_config.json`` body, config.json ``quantization_config``) for ModelOpt NVFP4.

    ``exclude``: modules left in BF16, written as ``fnmatch`` globs; every fused module (see
    :data:`FUSED_LINEARS`) whose members are all excluded is named too. The legacy file spells the list
    ``exclude_modules``; config.json's flat form ``ignore`` (vLLM reads only that key there) — we write
    both there. vLLM rejects a ModelOpt config without ``group_size`` and ``kv_cache_quant_algo``.
    ``activations``: "w4a16" (weight-only, what ``quantize`` writes) or "w4a4", which needs a calibrated
    static ``input_scale`` per NVFP4 linear (the calibration step writes those; see issue 12).
    """
    if activations not in MODELOPT_ALGO:
        raise ContainerError(f"ModelOpt activations {activations!r}: expected one of {sorted(MODELOPT_ALGO)}")
    mods = list(exclude) + _fused_exclusions(exclude, all_modules) if exclude else []
    every = list(all_modules) + list(fused_modules(all_modules))
    ex = [g for p in compact_regexes(mods, every) for g in regex_to_globs(p)] if mods else []
    quant = {"quant_algo": MODELOPT_ALGO[activations], "kv_cache_quant_algo": None, "group_size": NVFP4_GROUP,
             "exclude_modules": ex}
    hf = {"producer": _producer(version), "quantization": quant}
    cfg = {"quant_method": "modelopt", **quant, "ignore": ex, "producer": _producer(version)}
    return hf, cfg
