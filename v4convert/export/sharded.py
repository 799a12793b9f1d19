"""``export CKPT --sharded --tp N [--ep M] --out DIR``: our per-rank layout (see ``v4convert.sharded_layout``).

One streaming pass over the source tensors (any checkpoint ``Checkpoint`` opens: the FP8 release, our FP4
artifacts, BF16): each tensor's stored parts are cut per rank by ``v4convert.families.sharding`` without decoding
(codecs stay packed; a split that cuts a stored block is refused before anything is written) and appended,
4 KiB-aligned, to the rank files under ``DIR.partial``, renamed to ``DIR`` when complete. Memory: one tensor.
``--deepseek-mp`` (needs ``tp == ep``) also writes DeepSeek's ``model{r}-mp{N}.safetensors`` (its
``convert.py`` names, MTP layer dropped as it does) for DeepSeek's reference ``inference/generate.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from v4convert.formats.safetensors_io import (
    PlannedTensor,
    tensor_bytes,
    write_streaming,
)

from .. import outputs
from ..checkpoint import Checkpoint
from ..errors import UserError
from . import ExportResult
from ..families.roles import Family
from ..families.sharding import World, check_world, rank_parts, slice_stored
from ..sharded_layout import ALIGN, FORMAT, MANIFEST, VERSION, rank_file, sha256_of

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass
class Options:
    tp: int = field(default=1, metadata={"help": "Tensor-parallel ranks: attention heads, dense MLP, shared "
                                                 "experts, embed and head are split over them."})
    ep: int = field(default=1, metadata={"help": "Expert-parallel groups: routed experts are partitioned over them "
                                                 "(world size = max(tp, ep))."})
    deepseek_mp: bool = field(default=False, metadata={"help": "Also write DeepSeek's model{r}-mp{N}.safetensors "
                                                               "(needs tp == ep)."})
    allow_missing: bool = field(default=False, metadata={
        "help": "Export although the checkpoint lacks tensors its config implies (recorded in the output's marker)."})


def _stored_name(info, comp: str) -> str:
    return next(e.name for c, e in info.parts.items() if c == comp)


def _plan(ck: Checkpoint, world: World) -> list[tuple[str, dict]]:
    """Per tensor, ``rank -> Part`` (validated: shapes split, no stored block cut), before writing anything."""
    plan = []
    for info in ck.infos():
        parts = rank_parts(info.role, info.expert, info.shape, ck.arch, world)
        meta = {k: torch.empty(e.shape, dtype=torch.uint8, device="meta") for k, e in info.parts.items()}
        for part in parts.values():
            slice_stored(info.storage, meta, part, info.shape, f"{ck.root}: tensor {info.name}")
        plan.append((info.name, parts))
    return plan


def export(src: Path, out: Path, opts: Options, *, progress: bool = False) -> ExportResult:
    """Write the sharded layout of checkpoint ``src`` for ``opts.tp`` x ``opts.ep`` into directory ``out``."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    world = World(opts.tp, opts.ep)
    if opts.deepseek_mp and opts.tp != opts.ep:
        raise UserError(f"--deepseek-mp needs --tp == --ep (DeepSeek's model parallel splits heads and experts over "
                        f"the same ranks); got tp={opts.tp}, ep={opts.ep}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output directory exists and is not empty")
    outputs.claim(out, sources=[src])     # the output rule (v4convert.outputs): never inside the source, scratch ours
    with Checkpoint.open(src) as ck:
        incomplete = ck.check_complete(opts.allow_missing)   # refuse a half model (unless allowed)
        check_world(ck.arch, world)
        if opts.deepseek_mp and ck.arch.vocab % world.tp:
            raise UserError(f"{src}: --deepseek-mp: vocab_size {ck.arch.vocab} is not divisible by {world.tp} "
                            "(DeepSeek's ParallelEmbedding needs an even split)")
        plan = _plan(ck, world)
        tmp = out.with_name(out.name + ".partial")
        outputs.remove_ours(tmp)              # a failed run's scratch (claim checked it is ours)
        tmp.mkdir(parents=True)
        outputs.write_marker(tmp, "sharded", "writing")
        n = world.size
        records: list[dict] = []
        n_bytes = 0
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(tmp / rank_file(r, n), "wb")) for r in range(n)]
            bar = tqdm(total=len(plan), desc="sharding", unit="tensor", disable=not progress)
            for name, parts in plan:
                info = ck.tensor_info(name)
                raw = ck.raw(name)
                for r, part in parts.items():
                    f = files[r]
                    stored = slice_stored(info.storage, raw, part, info.shape, name)
                    rec_parts = {}
                    for comp, t in stored.items():
                        t = t.contiguous()
                        off = f.tell()
                        pad = (-off) % ALIGN
                        if pad:
                            f.write(b"\0" * pad)
                            off += pad
                        buf = tensor_bytes(t)
                        f.write(buf)
                        rec_parts[comp] = {"stored_name": _stored_name(info, comp), "dtype": info.parts[comp].dtype,
                                           "shape": list(t.shape), "offset": off, "bytes": buf.nbytes,
                                           "sha256": sha256_of(t)}
                        n_bytes += buf.nbytes
                    records.append({"name": name, "role": info.role.name, "codec": info.storage.value,
                                    "layer": info.layer, "expert": info.expert, "mtp": info.mtp,
                                    "shape": list(info.shape), "local_shape": list(part.shape(info.shape)),
                                    "rank": r, "file": rank_file(r, n),
                                    "split": None if part.dim is None else
                                    {"dim": part.dim, "start": part.start, "stop": part.stop},
                                    "parts": rec_parts})
                del raw
                ck.release(name)
                bar.update(1)
            bar.close()
        manifest = {"format": FORMAT, "version": VERSION,
                    "world": {"tp": world.tp, "ep": world.ep, "size": n},
                    "config": ck.config,
                    "recipe": {"source": str(src), "family": ck.family.value,
                               "quantization_config": ck.config.get("quantization_config")},
                    "files": [{"rank": r, "file": rank_file(r, n), "bytes": (tmp / rank_file(r, n)).stat().st_size}
                              for r in range(n)],
                    "tensors": records}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for fn in COPIED_FILES:
            if (src / fn).is_file():
                shutil.copyfile(src / fn, tmp / fn)
        notes = []
        paths = [out / rank_file(r, n) for r in range(n)] + [out / MANIFEST]
        if opts.deepseek_mp:
            mp_paths = _write_deepseek_mp(ck, plan, world, tmp)
            paths += [out / p.name for p in mp_paths]
            notes.append(f"DeepSeek model-parallel files: {', '.join(p.name for p in mp_paths)} (MTP layer dropped)")
        notes.append(f"run: torchrun --nproc-per-node {n} -m v4convert run {out} --prompt ...")
    outputs.write_marker(tmp, "sharded", "complete", **incomplete)
    if out.exists():
        out.rmdir()          # empty (checked above)
    os.replace(tmp, out)
    return ExportResult(paths, len(plan), n_bytes, time.perf_counter() - t0, notes,
                        label=f"sharded layout (tp={world.tp}, ep={world.ep}, {world.size} ranks)")


# ----------------------------------------------------------------------------------------------
# DeepSeek's own model-parallel files (inference/convert.py naming)
# ----------------------------------------------------------------------------------------------
# HF module name -> DeepSeek name (convert.py ``mapping``); the V3 family only (V4 publishes DeepSeek names).
_DS_NAMES = {"embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
             "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
             "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head",
             "wq_b": "wq_b", "wk": "wk", "k_norm": "k_norm", "weights_proj": "weights_proj"}


def deepseek_name(family: Family, stored: str) -> str:
    """DeepSeek ``inference/model.py`` name of an HF stored tensor name (V4 names are already DeepSeek's)."""
    if family is Family.V4:
        return stored
    name = stored.removeprefix("model.").replace("self_attn", "attn").replace("mlp", "ffn")
    name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
    parts = name.split(".")
    key = parts[-2]
    if key in _DS_NAMES:
        parts[-2] = _DS_NAMES[key]
    return ".".join(parts)


def _write_deepseek_mp(ck: Checkpoint, plan, world: World, tmp: Path) -> list[Path]:
    n = world.size
    n_layers = ck.arch.n_layers
    paths = []
    for r in range(n):
        planned = []
        for name, parts in plan:
            info = ck.tensor_info(name)
            if r not in parts or info.mtp or (info.layer is not None and info.layer >= n_layers):
                continue
            meta = {k: torch.empty(e.shape, dtype=torch.uint8, device="meta") for k, e in info.parts.items()}
            shapes = {k: tuple(t.shape) for k, t in slice_stored(info.storage, meta, parts[r], info.shape,
                                                                  name).items()}
            for comp, e in info.parts.items():
                def produce(name=name, comp=comp, part=parts[r], storage=info.storage, full=info.shape):
                    t = slice_stored(storage, ck.raw(name), part, full, name)[comp].contiguous().clone()
                    ck.release(name)
                    return t
                planned.append(PlannedTensor(deepseek_name(ck.family, e.name), e.dtype, shapes[comp], produce))
        p = tmp / f"model{r}-mp{n}.safetensors"
        write_streaming(p, planned, {"format": "pt"})
        paths.append(p)
    return paths

