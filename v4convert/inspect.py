"""``v4convert inspect``: what a checkpoint (or a bare config.json) holds, and what our outputs would weigh.

Works from headers only (a 700 GB download is inspected in seconds). Given a bare ``config.json``
the inventory is computed from the family table, so the published release can be checked to the
byte without downloading it.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from v4convert.formats.safetensors_io import ST_DTYPES

from gguf import GGMLQuantizationType

from v4convert.formats import gguf_quants

from .checkpoint import Checkpoint
from .export.gguf.exporter import ARCH_OF, GGUFType, TypeMix, gguf_types, slot_skip_reason
from .families.layout import Arch, Slot, inventory, stored_tensors
from .families.roles import RELEASE_ROUTING, Group, Role


def gguf_bytes(numel: int, ggml_type: str) -> int:
    """Bytes of ``numel`` values in GGML type ``ggml_type`` (block sizes from gguf-py's table)."""
    per, nbytes = gguf_quants.block_bytes(GGMLQuantizationType[ggml_type])
    return math.ceil(numel / per) * nbytes


@dataclass
class Entry:
    """One logical tensor as inspect sees it: slot facts + the stored parts (dtype, bytes)."""
    slot: Slot
    parts: list[tuple[str, int]]       # (safetensors dtype, bytes) of every stored tensor

    @property
    def nbytes(self) -> int:
        return sum(b for _, b in self.parts)


def _entries_from_config(a: Arch) -> list[Entry]:
    out = []
    for s in inventory(a):
        parts = [(dt, ST_DTYPES[dt][1] * math.prod(shape)) for _, dt, shape in stored_tensors(a, s)]
        out.append(Entry(s, parts))
    return out


def _entries_from_checkpoint(ck: Checkpoint) -> list[Entry]:
    out = []
    for i in ck.infos():
        s = Slot(i.name, i.role, i.layer, i.expert, i.shape, i.storage, i.mtp)
        out.append(Entry(s, [(e.dtype, e.nbytes) for e in i.parts.values()]))
    return out


# --------------------------------------------------------------------------------------------
# Output projections. Each maps a tensor to its bytes in that output (None = keep as stored).
# --------------------------------------------------------------------------------------------
_FFN_GROUPS = (Group.EXPERT, Group.SHARED_EXPERT, Group.DENSE_MLP)
_NEVER_QUANT = (Group.ROUTER, Group.EMBED, Group.HEAD, Group.NORM, Group.HYPER, Group.COMPRESSOR, Group.INDEXER,
                Group.ATTENTION_OTHER)


def _nvfp4(s: Slot) -> int:
    n, k = s.shape
    return n * k // 2 + n * k // 16 + 4


def _mxfp4(s: Slot) -> int:
    n, k = s.shape
    return n * k // 2 + n * k // 32


def _proj_nvfp4_experts(s: Slot) -> int | None:
    return _nvfp4(s) if s.role.group in _FFN_GROUPS else None


def _proj_nvfp4_all(s: Slot) -> int | None:
    return _nvfp4(s) if s.role.is_linear and s.role.group not in _NEVER_QUANT else None


def _proj_mxfp4_experts(s: Slot) -> int | None:
    return _mxfp4(s) if s.role.group in _FFN_GROUPS else None


def _gguf_export(mix: TypeMix) -> Callable[[Arch, Slot], int]:
    """Bytes of ``s`` in the GGUF ``export --gguf`` writes with ``mix``: the exporter's own type choice
    (``gguf_types``) and skip rule, so the projection cannot drift from the file."""
    def f(a: Arch, s: Slot) -> int:
        arch = ARCH_OF[a.family]
        if slot_skip_reason(a, s, arch, keep_mtp=True) is not None:
            return 0
        return sum(gguf_bytes(math.prod(shape), q.name) for shape, q in gguf_types(a, arch, s.role, s.name, s.shape, mix))
    return f


def _gguf(expert_type: str, other_type: str, head_type: str) -> Callable[[Arch, Slot], int]:
    """An estimate for types llama.cpp's own quantizer writes (K-quants): its choices are not ours."""
    def f(a: Arch, s: Slot) -> int:
        n = s.numel
        if s.role is Role.HASH_TABLE:
            return gguf_bytes(n, "I32")
        if len(s.shape) < 2 or s.role in (Role.ROUTER, Role.ROUTER_BIAS) or s.role.group is Group.HYPER \
                or s.role in (Role.COMPRESSOR_APE, Role.INDEXER_COMPRESSOR_APE):
            return gguf_bytes(n, "F32")
        if s.role.group is Group.EXPERT:
            return gguf_bytes(n, expert_type)
        if s.role in (Role.HEAD, Role.MTP_HEAD):
            return gguf_bytes(n, head_type)
        return gguf_bytes(n, other_type)
    return f


def _stored(fn: Callable[[Slot], int | None]) -> Callable[[Arch, Slot], int | None]:
    return lambda a, s: fn(s)


# key -> (description, (arch, slot) -> bytes in that output, None = kept as stored)
PROJECTIONS: dict[str, tuple[str, Callable[[Arch, Slot], int | None]]] = {
    "nvfp4-experts": ("NVFP4 experts + dense/shared MLP, attention kept as stored (FP8)", _stored(_proj_nvfp4_experts)),
    "nvfp4-all-linear": ("NVFP4 on every attention and MLP linear (router/embed/head kept)", _stored(_proj_nvfp4_all)),
    "mxfp4-experts": ("MXFP4 experts + dense/shared MLP, attention kept as stored", _stored(_proj_mxfp4_experts)),
    "gguf-q8_0": ("GGUF Q8_0 everywhere (norms/router F32)",
                  _gguf_export(TypeMix(GGUFType.Q8_0, GGUFType.Q8_0))),
    "gguf-q4_k": ("GGUF Q4_K-class (Q4_K linears, Q6_K head; estimate)", _gguf("Q4_K", "Q4_K", "Q6_K")),
    "gguf-mxfp4-moe": ("GGUF MXFP4 routed experts, Q8_0 elsewhere (the default export --gguf)",
                       _gguf_export(TypeMix())),
}


def _architecture(cfg: dict) -> str | None:
    """``architectures[0]`` when it is a list of strings (it is informational; anything else is ignored)."""
    a = cfg.get("architectures")
    return a[0] if isinstance(a, list) and a and isinstance(a[0], str) else None


# --------------------------------------------------------------------------------------------
def config_warnings(cfg: dict, a: Arch) -> list[str]:
    """What a source config lacks that consumers need: DeepSeek's release routing keys (vLLM builds
    softmax routing without ``e_score_correction_bias`` when they are absent, and cannot load the model)."""
    return [f"config.json lacks {k!r} (DeepSeek's release: {v!r}); vLLM cannot build the router without it. "
            f"`v4convert quantize` writes it into its outputs; add it to serve this checkpoint as is."
            for k, v in RELEASE_ROUTING[a.family].items() if k not in cfg]


def build_report(path: Path, budget=None, kv_tokens: int = 32768) -> dict:
    """Inspect a checkpoint directory or a bare config.json; returns a JSON-able report. ``budget``
    (``memfit.Budget``) adds ``memory_fit``: each recipe's weights + a KV cache of ``kv_tokens``."""
    path = Path(path)
    if path.is_file():
        from .paths import read_checkpoint_json
        cfg = read_checkpoint_json(path.parent, path.name, "config.json", 16 << 20)
        a = Arch.from_config(cfg, str(path))
        entries = _entries_from_config(a)
        source, shards, missing = "config", None, []
    else:
        ck = Checkpoint.open(path)
        cfg, a = ck.config, ck.arch
        entries = _entries_from_checkpoint(ck)
        source, shards, missing = "checkpoint", len(ck.shards()), [s.name for s in ck.missing()]
    by_role: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    params = {"main": 0, "mtp": 0}
    n_stored = 0
    for e in entries:
        params["mtp" if e.slot.mtp else "main"] += e.slot.numel
        n_stored += len(e.parts)
        for dt, b in e.parts:
            by_role[e.slot.role.name.lower()][dt] += b
    total = sum(e.nbytes for e in entries)
    projections = {}
    for key, (desc, fn) in PROJECTIONS.items():
        b = 0
        for e in entries:
            p = fn(a, e.slot)
            b += e.nbytes if p is None else p
        projections[key] = {"bytes": b, "description": desc}
    storages = defaultdict(int)
    for e in entries:
        storages[e.slot.storage.value] += 1
    fit = None
    if budget is not None:
        from .memfit import fit_report
        fit = fit_report(a, cfg, entries, {k: fn for k, (_, fn) in PROJECTIONS.items()}, budget, kv_tokens)
    return {
        "memory_fit": fit,
        "source": source, "path": str(path), "family": a.family.value,
        "architecture": _architecture(cfg),
        "layers": a.n_layers, "mtp_layers": a.n_mtp, "hidden_size": a.hidden, "vocab_size": a.vocab,
        "routed_experts": a.n_experts, "experts_per_token": a.top_k, "shared_experts": a.n_shared,
        "parameters": {**params, "total": params["main"] + params["mtp"]},
        "logical_tensors": len(entries), "stored_tensors": n_stored, "total_bytes": total,
        "shards": shards, "missing_tensors": missing, "storage_counts": dict(storages),
        "bytes_by_role_dtype": {r: dict(d) for r, d in sorted(by_role.items())},
        "projections": projections, "warnings": config_warnings(cfg, a),
    }


def _gb(b: int) -> str:
    return f"{b / 1e9:,.2f} GB" if b >= 1e8 else f"{b / 1e6:,.2f} MB"


def format_report(r: dict) -> str:
    p = r["parameters"]
    lines = [
        f"{r['path']}  ({r['source']})",
        f"  family        {r['family']} ({r['architecture']})",
        f"  layers        {r['layers']} + {r['mtp_layers']} MTP   hidden {r['hidden_size']}   vocab {r['vocab_size']}",
        f"  experts       {r['routed_experts']} routed, top-{r['experts_per_token']}, {r['shared_experts']} shared",
        f"  parameters    {p['main']:,} main + {p['mtp']:,} MTP = {p['total']:,}",
        f"  tensors       {r['stored_tensors']:,} stored ({r['logical_tensors']:,} logical)"
        + (f" in {r['shards']} shard(s)" if r["shards"] is not None else ""),
        f"  bytes         {r['total_bytes']:,} ({_gb(r['total_bytes'])})",
    ]
    if r["missing_tensors"]:
        lines.append(f"  missing       {len(r['missing_tensors'])} tensors the config implies, e.g. "
                     f"{r['missing_tensors'][0]}")
    for w in r["warnings"]:
        lines.append(f"  warning       {w}")
    lines.append("  bytes by role and dtype:")
    for role, d in r["bytes_by_role_dtype"].items():
        lines.append(f"    {role:<26} " + "  ".join(f"{dt} {_gb(b)}" for dt, b in sorted(d.items())))
    lines.append("  projected outputs:")
    for key, v in r["projections"].items():
        lines.append(f"    {key:<16} {_gb(v['bytes']):>12}   {v['description']}")
    if r.get("memory_fit"):
        from .memfit import format_fit
        lines += format_fit(r["memory_fit"])
    return "\n".join(lines)
