"""``v4convert export CKPT --gguf``: a DeepSeek checkpoint (as published, or our FP4 artifact) -> GGUF.

Reads tensors one at a time from the checkpoint, maps each role to llama.cpp's tensor name
(``export/gguf/names.py``), picks its GGML type from the type mix, quantizes (``formats.gguf_quants``) or
re-packs MXFP4 losslessly, and writes the files with ``export/gguf/engine.py`` (planned headers, worker
threads, journal, resume; a stacked experts tensor is encoded expert by expert). Metadata keys follow
llama.cpp's loaders (``src/models/deepseek2.cpp``, ``deepseek32.cpp``, ``deepseek4.cpp``) and its
converter (``conversion/deepseek.py``); the tokenizer comes from ``tokenizer.json`` /
``tokenizer_config.json``. An Ollama ``Modelfile`` is written beside the GGUF.

``gguf_as_checkpoint`` goes the other way (GGUF values, dequantized by gguf-py, back under the
checkpoint's names) so our runtime can run exactly the weights llama.cpp runs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT

from v4convert.formats import gguf_quants
from v4convert.export.gguf.names import GGUFArch, Kind, entry
from v4convert.formats.gguf_writer import KV, TensorSpec, layout_files

from v4convert.checkpoint import Checkpoint, TensorInfo
from v4convert.families.layout import Arch, Slot
from v4convert.families.roles import Family, Role, Storage
from v4convert import __version__, outputs

from . import engine
from .encode import KERNEL_ENV, _encode, _float, _quantize  # noqa: F401  (KERNEL_ENV: callers' name)
from .imatrix import OUT_CHUNKS, OUT_DATASET, OUT_ENTRIES, OUT_FILE, Imatrix, check_fits, read_imatrix
from .metadata import _write_modelfile, add_tokenizer, build_metadata
from .types import (ARCH_OF, LLAMA_PIN_EXPERTS, LLAMA_PIN_KV_B, LLAMA_PINS_F32, ExportError, ExportResult,  # noqa: F401
                    GGUFType, LlamaQuant, TypeMix, llama_quantize)


FP4_STORAGE = (Storage.MXFP4, Storage.NVFP4_CT, Storage.NVFP4_MODELOPT)


def _tensor_class(name: str) -> str:
    if "_exps." in name:
        return "routed experts"
    if "attn_k_b" in name or "attn_v_b" in name:
        return "MLA k_b/v_b"
    return "other tensors"


def mix_summary(arch: GGUFArch, specs: list[TensorSpec], main_note: str = "") -> str:
    """One line: GGML types per tensor class with tensor counts, e.g.
    ``GGUF deepseek2 type mix: routed experts MXFP4 x9; MLA k_b/v_b Q8_0 x8; other tensors F32 x29, Q8_0 x30``."""
    by: dict[str, dict[str, int]] = {}
    for s in specs:
        d = by.setdefault(_tensor_class(s.name), {})
        d[s.qtype.name] = d.get(s.qtype.name, 0) + 1
    order = ("routed experts", "MLA k_b/v_b", "other tensors")
    parts = [f"{c} " + ", ".join(f"{t} x{n}" for t, n in sorted(by[c].items(), key=lambda kv: -kv[1]))
             for c in order if c in by]
    return f"GGUF {arch.value} type mix{main_note}: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------- tensors
def skip_reason(ck: Checkpoint, info: TensorInfo, arch: GGUFArch, keep_mtp: bool) -> str | None:
    """Why a checkpoint tensor has no place in the GGUF (None: it is exported)."""
    return slot_skip_reason(ck.arch, info, arch, keep_mtp)


def slot_skip_reason(a: Arch, info: Slot | TensorInfo, arch: GGUFArch, keep_mtp: bool) -> str | None:
    """``skip_reason`` from the family's layout alone (``inspect`` projects with it)."""
    if info.mtp and arch is GGUFArch.DEEPSEEK4:
        # llama.cpp's converter writes V4's MTP block only into a separate draft GGUF (--mtp), whose
        # root hc_head tensors replace the model's; one file cannot carry both.
        return "V4 MTP block (llama.cpp loads it only from a separate draft GGUF)"
    if info.mtp and not keep_mtp:
        return "MTP block dropped (--no-mtp)"
    if arch is GGUFArch.DEEPSEEK4 and info.role is Role.ROUTER_BIAS and info.layer is not None \
            and info.layer < a.n_hash:
        return "hash-routed layer: llama.cpp routes by tid2eid and loads no selection bias"
    return None


def gguf_types(a: Arch, arch: GGUFArch, role: Role, name: str, shape: tuple[int, ...], mix: TypeMix
               ) -> list[tuple[tuple[int, ...], Q]]:
    """The GGUF tensors (shape, GGML type) one checkpoint tensor becomes: THE type choice of the exporter
    (``plan_tensors`` writes it; ``inspect`` projects sizes with it). Routed experts: one member's share of the
    stacked ``[E, out, in]`` tensor; MLA ``kv_b``: ``attn_k_b [H, r, nope]`` and ``attn_v_b [H, v, r]``."""
    e = entry(arch, role, name)
    if e.kind is Kind.KV_B:
        H, nope, v, r = a.n_heads, a.nope, a.v_head, shape[1]
        return [((H, r, nope), mix.resolve(e, nope)), ((H, v, r), mix.resolve(e, r))]
    if e.kind is Kind.INT32:
        return [(tuple(shape), Q.I32)]
    return [(tuple(shape), mix.resolve(e, shape[-1]))]


def plan_tensors(ck: Checkpoint, arch: GGUFArch, mix: TypeMix, keep_mtp: bool = True,
                 allow_nonfinite: bool = False) -> tuple[list[TensorSpec], list[str], list[str], list[str]]:
    """GGUF tensor specs in checkpoint order (experts stacked per layer and projection).

    Returns (specs, names re-packed losslessly from MXFP4, checkpoint names skipped with reasons,
    FP4-stored tensors quantized again ("NAME: storage -> type", lossy)).
    """
    a = ck.arch
    specs: list[TensorSpec] = []
    repacked: list[str] = []
    skipped: list[str] = []
    requantized: list[str] = []          # FP4 sources encoded again (lossy): "GGUF name: storage -> type"
    experts: dict[tuple[int, Role], list[TensorInfo]] = {}
    for info in ck.infos():
        if info.expert is not None:
            experts.setdefault((info.layer, info.role), []).append(info)
    done: set[tuple[int, Role]] = set()
    for info in ck.infos():
        why = skip_reason(ck, info, arch, keep_mtp)
        if why is not None:
            skipped.append(f"{info.name}: {why}")
            continue
        e = entry(arch, info.role, info.name)
        L = info.layer
        if e.kind is Kind.EXPERTS:
            key = (L, info.role)
            if key in done:
                continue
            done.add(key)
            members = sorted(experts[key], key=lambda m: m.expert)
            if [m.expert for m in members] != list(range(a.n_experts)):
                have = [m.expert for m in members]
                raise ExportError(f"{ck.root}: layer {L} {info.role.name}: experts {have[:8]}... present, "
                                  f"need all {a.n_experts}")
            out_f, in_f = info.shape
            ((_, q),) = gguf_types(a, arch, info.role, info.name, info.shape, mix)
            (name,) = e.format(L)
            if q == Q.MXFP4 and all(m.storage is Storage.MXFP4 for m in members):
                repacked.append(name)
            elif any(m.storage in FP4_STORAGE for m in members) and q != Q.F32:
                requantized.append(f"{name}: {members[0].storage.value} -> {q.name}")
            specs.append(TensorSpec(name, (a.n_experts, out_f, in_f), q,
                                    lambda ms=members, q=q: (_encode(ck, m, q, allow_nonfinite) for m in ms),
                                    parts=[lambda m=m, q=q: _encode(ck, m, q, allow_nonfinite) for m in members]))
        elif e.kind is Kind.KV_B:
            H, nope, v, r = a.n_heads, a.nope, a.v_head, info.shape[1]
            if info.shape[0] != H * (nope + v):
                raise ExportError(f"{ck.root}: tensor {info.name}: {info.shape[0]} rows, expected heads x (nope + v) "
                                  f"= {H * (nope + v)}")
            kb_name, vb_name = e.format(L)
            (_, qk), (_, qv) = gguf_types(a, arch, info.role, info.name, info.shape, mix)

            def k_b(info=info, q=qk, H=H, nope=nope, v=v, r=r):
                w = _float(ck, info, allow_nonfinite).view(H, nope + v, r)
                return _quantize(w[:, :nope].transpose(1, 2).contiguous(), q, info.name)

            def v_b(info=info, q=qv, H=H, nope=nope, v=v, r=r):
                w = _float(ck, info, allow_nonfinite).view(H, nope + v, r)
                return _quantize(w[:, nope:].contiguous(), q, info.name)
            specs.append(TensorSpec(kb_name, (H, r, nope), qk, k_b))
            specs.append(TensorSpec(vb_name, (H, v, r), qv, v_b))
        elif e.kind is Kind.INT32:
            (name,) = e.format(L)
            specs.append(TensorSpec(name, info.shape, Q.I32,
                                    lambda info=info: ck.raw(info.name)["weight"].to(torch.int32)))
        else:
            (name,) = e.format(L)
            ((_, q),) = gguf_types(a, arch, info.role, info.name, info.shape, mix)
            if q == Q.MXFP4 and info.storage is Storage.MXFP4:
                repacked.append(name)
            elif info.storage in FP4_STORAGE and q != Q.F32:
                requantized.append(f"{name}: {info.storage.value} -> {q.name}")
            specs.append(TensorSpec(name, info.shape, q, lambda info=info, q=q: _encode(ck, info, q, allow_nonfinite)))
    return specs, repacked, skipped, requantized


class NotLoadableError(ExportError):
    """The config breaks a constraint of llama.cpp's loader / graph for its arch (``export.gguf.constraints``)."""


def _imatrix_args(im: Imatrix, path: Path, model: Path, log: Callable[[str], None] | None
                  ) -> tuple[dict[str, np.ndarray], list[tuple[str, str | int]]]:
    """The quantizer's imatrix weights (checked against ``model``'s tensors) and the ``quantize.imatrix.*`` KVs
    llama-quantize records (file as given, first dataset, entries loaded, chunks)."""
    from v4convert.formats.gguf_reader import read_gguf_header
    used = check_fits(im, path, {t.name: t.shape for t in read_gguf_header(model).tensors})
    if log:
        log(f"imatrix {path}: {len(im.entries)} entries, {len(used)} match tensors of the model")
    kv: list[tuple[str, str | int]] = [(OUT_FILE, str(path))]
    if im.datasets:
        kv.append((OUT_DATASET, im.datasets[0]))
    kv.append((OUT_ENTRIES, len(im.entries)))
    if im.chunk_count > 0:
        kv.append((OUT_CHUNKS, im.chunk_count))
    return im.weights(), kv


def check_llama_loadable(ckpt: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose GGUF llama.cpp would not load (before writing anything)."""
    from .constraints import violations
    with Checkpoint.open(ckpt) as ck:
        arch = ARCH_OF[ck.family]
        bad = violations(arch, ck.arch, ck.config)
    if bad:
        raise NotLoadableError(f"{Path(ckpt) / 'config.json'}: llama.cpp cannot load this model as GGUF: "
                               + "; ".join(bad))


def _stale(out: Path, finals: list[Path]) -> list[Path]:
    """Files of an earlier export to the same ``out`` that this one does not rewrite (``X.gguf`` when
    now split, or splits of another count); replaced like the rest: ours only, with --overwrite."""
    stem = out.name[:-5]
    pat = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf")
    old = [p for p in out.parent.glob(f"{glob.escape(stem)}-*-of-*.gguf") if pat.fullmatch(p.name)]
    return sorted(p for p in {*old, out} if (p.exists() or p.is_symlink()) and p not in finals)


def _check_runtime_config(ck: Checkpoint) -> None:
    """The GGUF metadata carries what the runtime needs (rope, router groups, V4 window, ...): validate it
    the way the runtime does, so a broken config is one line here, not a KeyError mid-metadata."""
    from v4convert.runtime.args import ModelArgs
    from v4convert.runtime.v4_args import V4Args
    (V4Args if ck.family is Family.V4 else ModelArgs).from_config(ck.config, str(ck.root / "config.json"))


def _claim(src: Path, finals: list[Path], modelfile: bool, overwrite: bool, out: Path) -> list[Path]:
    """The output rule (``v4convert.outputs``) for a GGUF export to ``out``: its files (``finals``), their
    ``.partial`` scratch and the engine's journal, the Modelfile and stale files of an earlier export; refused
    before anything is written. Returns the stale files (removed once the new export is in place)."""
    stale = _stale(out, finals)
    also = finals[1:] + ([finals[0].with_name("Modelfile")] if modelfile else []) + stale
    resuming = outputs.swap_pending(finals[0])     # a kill while renaming our files into place
    outputs.claim(finals[0], sources=[src], overwrite=overwrite or resuming, also=also,
                  scratch=[p.with_name(p.name + ".partial") for p in finals + also]
                  + [outputs.swap_journal(finals[0]), engine.journal_dir(out)])
    return stale


def export_gguf(ckpt: str | Path, out: str | Path, mix: TypeMix = TypeMix(), *, keep_mtp: bool = True,
                split_max_size: int | None = None, progress: bool = False, modelfile: bool = True,
                name: str | None = None, llama_type: LlamaQuant | None = None, overwrite: bool = False,
                allow_missing: bool = False, allow_nonfinite: bool = False, llama_experts: bool = False,
                log: Callable[[str], None] | None = None, imatrix: Path | None = None, workers: int | None = None,
                sync_bytes: int = engine.DEFAULT_SYNC_BYTES) -> ExportResult:
    """Write ``ckpt`` as GGUF to ``out`` (or its ``-0000k-of-0000N`` splits); see the module docstring.

    ``llama_type``: a K-quant / IQ type for the ``main`` class, written by llama.cpp's quantizer from an
    intermediate file in which those tensors are BF16 and everything else is already final (experts in
    ``mix.expert``, k_b / v_b Q8_0, F32 tensors), pinned so llama.cpp copies them unchanged.
    ``llama_experts``: the routed experts go to llama.cpp's quantizer too (BF16 in the intermediate,
    not pinned): the whole-file meaning of ``--type Q4_K_M``. ``log`` gets the resolved type mix
    (``mix_summary``) before any tensor is written. ``imatrix``: an importance matrix file (ours or
    llama-imatrix's, ``export/gguf/imatrix.py``) handed to llama.cpp's quantizer (``llama_type`` only).
    ``workers``: encoder threads (None: ``engine.default_workers()``); ``sync_bytes``: output bytes between
    fsync + journal appends (a killed run redoes at most that much). Rerunning a killed export resumes it
    (``engine``); the llama.cpp quantizer step of ``llama_type`` is redone whole.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output file name must end in .gguf")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: output directory does not exist")
    if workers is not None and workers < 0:
        raise ExportError(f"--workers {workers}: must be 0 (the default: min(2, CPUs)) or more")
    check_llama_loadable(ckpt)
    im = None
    if imatrix is not None:
        if llama_type is None:
            raise ExportError(f"--imatrix is used by llama.cpp's quantizer types ({', '.join(t.name for t in LlamaQuant)});"
                              f" the types we write ({', '.join(t.value for t in GGUFType)}) ignore it")
        im = read_imatrix(Path(imatrix))           # bad file: exit 2 before anything is written
    if llama_type is not None:
        if split_max_size:
            raise ExportError("--split-max-size with a llama.cpp-quantized --type is not supported yet")
        tmp = out.with_name(out.stem + ".intermediate.gguf")
        stale = _claim(Path(ckpt), [out], modelfile, overwrite, out)
        mla = GGUFType.Q8_0                                  # K-quant / IQ main types are below 8 bits
        expert = GGUFType.BF16 if llama_experts else mix.expert
        note = (f" (intermediate: llama.cpp's {llama_type.name} quantizer then rewrites the BF16 tensors, "
                f"with its fallback types where rows are not whole 256-blocks)")
        inter = export_gguf(ckpt, tmp, TypeMix(GGUFType.BF16, expert, mla), keep_mtp=keep_mtp,
                            progress=progress, modelfile=False, name=name, overwrite=True,
                            allow_missing=allow_missing, allow_nonfinite=allow_nonfinite, workers=workers,
                            sync_bytes=sync_bytes,
                            log=(lambda line: log(line.replace(" type mix", " type mix" + note, 1))) if log else None)
        pins = [(p, Q.F32) for p in LLAMA_PINS_F32] + [(LLAMA_PIN_KV_B, mla.qtype)]
        if not llama_experts:
            pins.append((LLAMA_PIN_EXPERTS, mix.expert.qtype))
        part = out.with_name(out.name + ".partial")
        try:
            weights, kv = _imatrix_args(im, Path(imatrix), tmp, log) if im is not None else (None, [])
            llama_quantize(tmp, part, llama_type, pins, imatrix=weights, kv=kv)
            outputs.begin_swap(out, [out] + ([out.with_name("Modelfile")] if modelfile else []))
            os.replace(part, out)             # write new, then swap
        finally:
            tmp.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
        res = ExportResult([out], inter.arch, inter.n_tensors, out.stat().st_size, time.perf_counter() - t0,
                           inter.repacked, inter.skipped, None, inter.requantized, inter.plan)
        if modelfile:
            res.modelfile = _write_modelfile(ckpt, out, [out])
        for p in stale:
            outputs.remove_ours(p)
        outputs.end_swap(out)
        return res
    with Checkpoint.open(ckpt) as ck:
        arch = ARCH_OF[ck.family]
        absent = ck.check_complete(allow_missing)
        _check_runtime_config(ck)
        specs, repacked, skipped, requantized = plan_tensors(ck, arch, mix, keep_mtp, allow_nonfinite)
        n_mtp = len({int(s.name.split(".")[1]) for s in specs
                     if s.name.startswith("blk.") and int(s.name.split(".")[1]) >= ck.arch.n_layers})
        md = build_metadata(ck, arch, mix, n_mtp, name or Path(ckpt).resolve().name)
        if absent.get("allowed_missing"):
            md.u32("v4convert.allowed_missing.count", absent["allowed_missing"]["count"])
            md.arr("v4convert.allowed_missing.first", absent["allowed_missing"]["first"], VT.STRING)
        special = add_tokenizer(md, ck.root, ck.arch.vocab)
        files = layout_files(out, md, specs, split_max_size, every_split=[KV(outputs.GGUF_MARKER_KEY, VT.STRING,
                                                                            __version__)])
        finals = [f.path for f in files]
        stale = _claim(ck.root, finals, modelfile, overwrite, out)
        total = sum(s.nbytes for s in specs)
        plan = mix_summary(arch, specs)
        if log:
            log(plan)
        fp = engine.fingerprint(files, {"source": _source_id(ck), "keep_mtp": keep_mtp,
                                        "allow_nonfinite": allow_nonfinite, "split_max_size": split_max_size})
        _open_shards(ck)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {arch.value}")
        try:
            def step(what: str, path: Path) -> None:
                if what == "written":
                    outputs.begin_swap(finals[0], finals + stale + ([out.with_name("Modelfile")] if modelfile else []))
                outputs.kill_point(f"gguf:{what}")
            paths = engine.execute(files, engine.Journal(engine.journal_dir(out)), fp, workers=workers,
                                   sync_bytes=sync_bytes, progress=bar.update if bar else None, on_step=step,
                                   log=log or (lambda m: None))
        finally:
            if bar:
                bar.close()
        mf = _write_modelfile(ck.root, out, paths, special) if modelfile else None
        for p in stale:
            outputs.remove_ours(p)
        outputs.end_swap(paths[0])
    return ExportResult(paths, arch, len(specs), total, time.perf_counter() - t0, repacked, skipped, mf,
                        requantized, plan)


def _source_id(ck: Checkpoint) -> list:
    """The source as the fingerprint sees it: directory, and per shard its name, size and safetensors header
    (what is where); a re-downloaded or edited shard changes it."""
    ids = []
    for p in ck.shards():
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            hdr = f.read(min(n, 100 << 20))
        ids.append([p.name, p.stat().st_size, hashlib.sha256(hdr).hexdigest()])
    return [str(ck.root.resolve()), ids]


def _open_shards(ck: Checkpoint) -> None:
    """Map every shard once from this thread, before the worker threads read tensors concurrently."""
    seen: set[Path] = set()
    for info in ck.infos():
        if not {e.path for e in info.parts.values()} <= seen:
            seen.update(e.path for e in info.parts.values())
            ck.raw(info.name)
            ck.release(info.name)


# ------------------------------------------------------------------------------ GGUF -> checkpoint
def read_gguf_tensors(paths: list[Path]) -> dict[str, tuple[np.ndarray, Q]]:
    """name -> (raw data as stored, GGML type) over all splits (memory-mapped by gguf-py's reader)."""
    from gguf import GGUFReader

    from v4convert.formats.gguf_reader import GGUFFormatError, read_gguf_header
    out: dict[str, tuple[np.ndarray, Q]] = {}
    for p in paths:
        try:
            read_gguf_header(p)          # validated before gguf-py's reader trusts it
        except GGUFFormatError as e:
            raise ExportError(str(e)) from None
        for t in GGUFReader(p).tensors:
            out[t.name] = (t.data, Q(int(t.tensor_type)))
    return out


def gguf_values(data: np.ndarray, q: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values (or int64 for I32) of one GGUF tensor in torch ``shape``, via gguf-py's dequantizers."""
    if q == Q.I32:
        return torch.from_numpy(np.asarray(data).astype(np.int64)).reshape(shape)
    vals = gguf_quants.dequantize(np.ascontiguousarray(data), q)
    return torch.from_numpy(np.array(vals, dtype=np.float32, copy=True)).reshape(shape)


def gguf_as_checkpoint(gguf_paths: list[Path], ckpt: str | Path, out_dir: str | Path, keep_mtp: bool = True) -> Path:
    """Write a float32 checkpoint with ``ckpt``'s names and config holding the values of the GGUF.

    Tensors the GGUF does not carry (see ``skip_reason``) keep the checkpoint's own values. The
    result is what our runtime must compute to match llama.cpp on the same file.
    """
    import shutil

    from v4convert.formats.safetensors_io import PlannedTensor, write_streaming

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    tensors = read_gguf_tensors([Path(p) for p in gguf_paths])
    with Checkpoint.open(ckpt) as ck:
        arch = ARCH_OF[ck.family]
        a = ck.arch
        planned: list[PlannedTensor] = []
        stacked: dict = {}                          # the last stacked expert tensor, dequantized

        def values(info: TensorInfo) -> torch.Tensor:
            if skip_reason(ck, info, arch, keep_mtp) is not None:
                return ck.dequantize(info.name)
            e = entry(arch, info.role, info.name)
            names = e.format(info.layer)
            if e.kind is Kind.KV_B:
                H, nope, v, r = a.n_heads, a.nope, a.v_head, info.shape[1]
                k = gguf_values(*tensors[names[0]], (H, r, nope)).transpose(1, 2)
                vv = gguf_values(*tensors[names[1]], (H, v, r))
                return torch.cat([k, vv], dim=1).reshape(info.shape).contiguous()
            if e.kind is Kind.EXPERTS:              # dequantize each stacked tensor once (experts come in order)
                if stacked.get("name") != names[0]:
                    stacked.update(name=names[0], vals=gguf_values(*tensors[names[0]], (a.n_experts, *info.shape)))
                return stacked["vals"][info.expert].clone()
            return gguf_values(*tensors[names[0]], info.shape)

        for info in ck.infos():
            dt = "I64" if info.storage is Storage.I64 else "F32"
            planned.append(PlannedTensor(info.name, dt, info.shape, lambda info=info: values(info)))
        write_streaming(out_dir / "model.safetensors", planned, {"format": "pt"})
        cfg = dict(ck.config)
        cfg.pop("quantization_config", None)
        cfg.pop("expert_dtype", None)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (ck.root / f).is_file():
                shutil.copy(ck.root / f, out_dir / f)
    return out_dir
