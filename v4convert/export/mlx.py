"""``export --mlx``: an mlx-lm model directory (Apple-silicon users' runner), streamed tensor by tensor.

Output (what ``mlx_lm.convert`` writes, so ``mlx_lm.load(DIR)`` / ``mlx_lm.generate`` take it as is):

* ``config.json``: the source config without its ``quantization_config``, plus mlx-lm's ``quantization``
  block (copied to ``quantization_config`` as mlx-lm's ``save_config`` does): top-level
  ``{"group_size", "bits", "mode"}`` and one entry per module whose quantization differs from it;
  ``rope_theta`` / ``rope_scaling`` spelled out where the source only has transformers' ``rope_parameters``.
* ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` (5 GiB shards in tensor order, mlx-lm's
  ``MAX_FILE_SIZE_GB``) + ``model.safetensors.index.json``; tensors under mlx-lm's *sanitized* names, so
  its ``sanitize`` leaves them alone: routed experts stacked as ``mlp.switch_mlp.{gate,up,down}_proj``
  ``[E, out, in]``; MLA ``kv_b_proj`` split into ``self_attn.embed_q`` ``[H, kv_lora, nope]`` and
  ``self_attn.unembed_out`` ``[H, v_head, kv_lora]`` (mlx-lm's absorbed-attention weights).
* tokenizer and generation files copied.

Quantized modules are stored in MLX's packed layout (``v4convert.formats.mlx_quant``): ``mxfp4`` (E8M0 per
32; MXFP4 sources -- V4 experts, our MXFP4 artifacts -- are re-packed byte for byte), ``nvfp4`` (E4M3 per 16,
no tensor scale: MLX's ``QuantizedLinear`` has none, so NVFP4 sources are re-rounded), ``affine`` 4/8-bit.
Unquantized tensors are written in ``dtype`` (default bfloat16); the router's selection bias stays float32
(mlx-lm's ``cast_predicate`` keeps it). A module whose row length is not a whole number of groups is
kept unquantized (a note says which).

Not exported (notes say so): the MTP block -- mlx-lm's DeepSeek models have no MTP module and would
refuse the weights. Families mlx-lm lacks are refused before any work (:data:`MLX_LM_MODELS`).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from v4convert import outputs
from v4convert.checkpoint import Checkpoint, TensorInfo
from v4convert.errors import UserError
from v4convert.formats import mlx_quant as mq
from v4convert.formats.mlx_quant import MLXMode, MLXPacked, MLXQuant
from v4convert.formats.safetensors_io import TORCH_TO_ST, PlannedTensor, write_streaming
from v4convert.formats.sharding import group_in_order
from v4convert.export import ExportResult
from v4convert.families.roles import Family, Group, Role, Storage

MLX_LM_CHECKED = "0.32.2"      # the mlx-lm release these names and layouts were checked against
# our family -> mlx-lm model module (``mlx_lm/models/<name>.py``) in MLX_LM_CHECKED; None: it has none
MLX_LM_MODELS: dict[Family, str | None] = {
    Family.V3: "deepseek_v3",
    Family.V32: "deepseek_v32",
    Family.V4: None,
}
V4_REFUSAL = (f"mlx-lm {MLX_LM_CHECKED} has no deepseek_v4 model (its DeepSeek models are deepseek, deepseek_v2, "
              f"deepseek_v3, deepseek_v32 and deepseek_v41; deepseek_v41 is a different architecture: no "
              f"hash-routed layers (tid2eid), shared-KV source layers, other config keys), so a V4 checkpoint "
              f"cannot be exported for it; export --gguf runs V4 in llama.cpp")
SHARD_BYTES = 5 << 30          # mlx-lm utils.MAX_FILE_SIZE_GB
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "tokenizer.model")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXPERT_PROJ = {Role.EXPERT_GATE: "gate_proj", Role.EXPERT_UP: "up_proj", Role.EXPERT_DOWN: "down_proj"}
F32_ROLES = (Role.ROUTER_BIAS,)          # kept float32 by mlx-lm's cast_predicate
_SPEC_RE = re.compile(r"^(affine)(4|8)(?:-g(32|64|128))?$|^(mxfp4|nvfp4)$|^(none)$")


class MLXExportError(UserError):
    """Bad options or a checkpoint this exporter cannot write for mlx-lm."""


def parse_spec(text: str) -> MLXQuant | None:
    """``affine4`` / ``affine8`` (group 64; ``-g32`` / ``-g128`` to change), ``mxfp4``, ``nvfp4``, or
    ``none`` (unquantized, in the export dtype) -> :class:`MLXQuant` (None for ``none``)."""
    m = _SPEC_RE.match(text.strip().lower())
    if m is None:
        raise MLXExportError(f"unknown MLX quantization {text!r}: use affine4, affine8 (optionally -g32/-g64/-g128), "
                             f"mxfp4, nvfp4 or none")
    if m.group(5):
        return None
    if m.group(1):
        return MLXQuant(MLXMode.AFFINE, int(m.group(2)), int(m.group(3) or 64))
    mode = MLXMode(m.group(4))
    return MLXQuant(mode, 4, mq.MX_GROUP if mode is MLXMode.MXFP4 else mq.NV_GROUP)


@dataclass
class Options:
    """What goes where. Specs: ``affine4``, ``affine8[-gN]``, ``mxfp4``, ``nvfp4``, ``none``."""
    quant: str = field(default="affine8", metadata={
        "cli": "--mlx-quant",
        "help": "MLX quantization of embedding, head, dense MLP and shared experts: affine4, "
                "affine8[-g32|-g64|-g128], mxfp4, nvfp4 or none."})
    attention: str | None = field(default=None, metadata={
        "cli": "--mlx-attention",
        "help": "MLX quantization of attention projections (incl. MLA embed_q / unembed_out and the V3.2 "
                "indexer); default: --mlx-quant."})
    experts: str = field(default="mxfp4", metadata={
        "cli": "--mlx-experts", "help": "MLX quantization of routed experts (MXFP4 sources re-pack losslessly)."})
    dtype: str = field(default="bfloat16", metadata={
        "cli": "--mlx-dtype", "choices": list(DTYPES),
        "help": "MLX dtype of unquantized tensors and affine scales/biases."})
    shard_bytes: int | None = field(default=None, metadata={
        "cli": "--mlx-shard-size", "size": True,
        "help": "Largest MLX safetensors shard (e.g. 2G; default 5 GiB like mlx-lm)."})
    allow_missing: bool = field(default=False, metadata={
        "help": "Export although the checkpoint lacks tensors its config implies (recorded in the output's marker)."})


@dataclass
class _Module:
    """One MLX parameter group: ``name`` (without ``.weight``), logical ``shape`` (stacked experts ``[E, out,
    in]``), ``quant`` (None: float), and ``parts()`` yielding one :class:`MLXPacked` (or float tensor) per
    stacked row (one item when not stacked)."""
    name: str
    shape: tuple[int, ...]
    quant: MLXQuant | None
    parts: Callable[[], Iterator[MLXPacked | torch.Tensor]]
    stacked: bool
    st_dtype: str
    float_name: str | None = None      # unquantized tensors not named NAME.weight (e.g. a selection bias)


def _planned(m: _Module) -> list[PlannedTensor]:
    """The safetensors entries of one module; the module is encoded once (scales/biases of each row are
    kept until their own entry is written: a few percent of the weight bytes)."""
    if m.quant is None:
        def produce_f() -> Iterator[torch.Tensor]:
            for t in m.parts():
                yield t[None] if m.stacked else t
        return [PlannedTensor(m.float_name or f"{m.name}.weight", m.st_dtype, m.shape, produce_f)]
    q = m.quant
    k = m.shape[-1]
    lead = m.shape[:-1]
    stash: dict[str, list[torch.Tensor]] = {"scales": [], "biases": []}

    def produce_w() -> Iterator[torch.Tensor]:
        for p in m.parts():
            stash["scales"].append(p.scales)
            if p.biases is not None:
                stash["biases"].append(p.biases)
            w = p.weight.view(torch.int32)
            yield w[None] if m.stacked else w

    def produce(kind: str) -> Callable[[], Iterator[torch.Tensor]]:
        def gen() -> Iterator[torch.Tensor]:
            while stash[kind]:
                t = stash[kind].pop(0)
                yield t[None] if m.stacked else t
        return gen

    scale_dt = m.st_dtype if q.mode is MLXMode.AFFINE else "U8"
    out = [PlannedTensor(f"{m.name}.weight", "U32", (*lead, k * q.bits // 32), produce_w),
           PlannedTensor(f"{m.name}.scales", scale_dt, (*lead, k // q.group_size), produce("scales"))]
    if q.mode is MLXMode.AFFINE:
        out.append(PlannedTensor(f"{m.name}.biases", scale_dt, (*lead, k // q.group_size), produce("biases")))
    return out


class _Planner:
    def __init__(self, ck: Checkpoint, opts: Options) -> None:
        self.ck, self.opts = ck, opts
        if opts.dtype not in DTYPES:
            raise MLXExportError(f"dtype {opts.dtype!r}: use one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[opts.dtype]
        self.st_dtype = TORCH_TO_ST[self.dtype]
        self.main = parse_spec(opts.quant)
        self.attn = parse_spec(opts.attention) if opts.attention is not None else self.main
        self.expert = parse_spec(opts.experts)
        self.notes: list[str] = []
        self.repacked = 0
        self.config_entries: dict[str, MLXQuant | None] = {}

    def spec_for(self, info: TensorInfo) -> MLXQuant | None:
        g = info.role.group
        if not info.role.is_linear and info.role is not Role.EMBED:
            return None
        if g is Group.EXPERT:
            return self.expert
        if g in (Group.ATTENTION, Group.INDEXER):
            return self.attn
        if g is Group.ROUTER:
            return None               # MoEGate holds a plain array in mlx-lm, never quantized
        return self.main

    def fit(self, name: str, q: MLXQuant | None, k: int) -> MLXQuant | None:
        """``q`` adjusted to a row length ``k``: affine falls back to a smaller group that divides ``k``;
        otherwise a module that cannot be grouped stays float (noted)."""
        if q is None or mq.fits(q, k):
            return q
        if q.mode is MLXMode.AFFINE:
            for g in mq.AFFINE_GROUPS:
                if g < q.group_size and k % g == 0:
                    return MLXQuant(q.mode, q.bits, g)
        self.notes.append(f"{name}: row length {k} is no whole number of {q.mode.value} groups of "
                          f"{q.group_size}: kept {self.opts.dtype}")
        return None

    def _float(self, info: TensorInfo) -> torch.Tensor:
        dt = torch.float32 if info.role in F32_ROLES else self.dtype
        return self.ck.dequantize(info.name).to(dt)

    def _encode(self, info: TensorInfo, q: MLXQuant, w: torch.Tensor | None = None) -> MLXPacked:
        if w is None and q.mode is MLXMode.MXFP4 and info.storage is Storage.MXFP4:
            raw = self.ck.raw(info.name)
            return mq.mxfp4_repack(raw["weight"], raw["scale"], info.name)
        return mq.encode(self.ck.dequantize(info.name) if w is None else w, q, self.dtype, info.name)

    def modules(self) -> list[_Module]:
        ck, a = self.ck, self.ck.arch
        experts: dict[tuple[int, Role], list[TensorInfo]] = {}
        for info in ck.infos():
            if info.expert is not None and not info.mtp:
                experts.setdefault((info.layer, info.role), []).append(info)
        out: list[_Module] = []
        seen: set[tuple[int, Role]] = set()
        n_mtp = 0
        for info in ck.infos():
            if info.mtp:
                n_mtp += 1
                continue
            spec = self.spec_for(info)
            if info.expert is not None:
                key = (info.layer, info.role)
                if key in seen:
                    continue
                seen.add(key)
                members = sorted(experts[key], key=lambda m: m.expert)
                if [m.expert for m in members] != list(range(a.n_experts)):
                    raise MLXExportError(f"{ck.root}: layer {info.layer} {info.role.name}: experts "
                                         f"{[m.expert for m in members][:8]}... present, need all {a.n_experts}")
                name = f"model.layers.{info.layer}.mlp.switch_mlp.{EXPERT_PROJ[info.role]}"
                q = self.fit(name, spec, info.shape[-1])
                if q is not None and q.mode is MLXMode.MXFP4 and all(m.storage is Storage.MXFP4 for m in members):
                    self.repacked += 1
                out.append(self._module(name, (a.n_experts, *info.shape), q, members, stacked=True))
            elif info.role is Role.ATTN_KV_B:
                out.extend(self._kv_b(info, spec))
            else:
                name = info.name.removesuffix(".weight")
                q = self.fit(name, spec, info.shape[-1]) if len(info.shape) == 2 else None
                mod = self._module(name, info.shape, q, [info], stacked=False)
                mod.float_name = info.name
                out.append(mod)
        if n_mtp:
            self.notes.append(f"MTP block not exported ({n_mtp} tensors): mlx-lm's DeepSeek models have no MTP module")
        return out

    def _module(self, name: str, shape: tuple[int, ...], q: MLXQuant | None, infos: list[TensorInfo],
                stacked: bool) -> _Module:
        self.config_entries[name] = q
        f32 = infos[0].role in F32_ROLES
        if q is None:
            return _Module(name, shape, None, lambda: (self._float(i) for i in infos), stacked,
                           "F32" if f32 else self.st_dtype)
        return _Module(name, shape, q, lambda: (self._encode(i, q) for i in infos), stacked, self.st_dtype)

    def _kv_b(self, info: TensorInfo, spec: MLXQuant | None) -> list[_Module]:
        """kv_b_proj ``[H*(nope+v), r]`` -> embed_q ``[H, r, nope]`` and unembed_out ``[H, v, r]`` (mlx-lm's
        ``sanitize`` split, done here so its re-quantization of kv_b never runs)."""
        a = self.ck.arch
        H, nope, v, r = a.n_heads, a.nope, a.v_head, info.shape[1]
        if info.shape[0] != H * (nope + v):
            raise MLXExportError(f"{self.ck.root}: tensor {info.name}: {info.shape[0]} rows, expected heads x "
                                 f"(nope + v) = {H * (nope + v)}")
        base = info.name.removesuffix(".kv_b_proj.weight")
        cache: dict[str, torch.Tensor] = {}

        def part(which: str) -> torch.Tensor:
            if which not in cache:                      # dequantize kv_b once for both halves
                w = self.ck.dequantize(info.name).view(H, nope + v, r)
                cache["k"] = w[:, :nope].transpose(1, 2).contiguous()
                cache["v"] = w[:, nope:].contiguous()
            return cache.pop(which)

        mods = []
        for which, name, shape in (("k", f"{base}.embed_q", (H, r, nope)), ("v", f"{base}.unembed_out", (H, v, r))):
            q = self.fit(name, spec, shape[-1])
            self.config_entries[name] = q
            def parts(which: str = which, q: MLXQuant | None = q, name: str = name) -> Iterator:
                w = part(which)
                yield w.to(self.dtype) if q is None else mq.encode(w, q, self.dtype, name)
            mods.append(_Module(name, shape, q, parts, False, self.st_dtype))
        return mods

    def quantization_config(self) -> dict | None:
        used = [q for q in self.config_entries.values() if q is not None]
        if not used:
            return None
        top = max(set(used), key=used.count)
        cfg: dict = top.config()
        for name, q in self.config_entries.items():
            if q is not None and q != top:
                cfg[name] = q.config()
        return cfg


def _rope_keys(cfg: dict) -> None:
    """mlx-lm reads ``rope_theta`` / ``rope_scaling``; transformers 5 configs may only have ``rope_parameters``."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default" and cfg.get("rope_scaling") is None:
        cfg["rope_scaling"] = {**{k: v for k, v in rp.items() if k != "rope_theta"}, "type": kind}


def export_mlx(src: Path, out: Path, opts: Options | None = None, *, progress: bool = False) -> ExportResult:
    """Write checkpoint ``src`` as an mlx-lm model directory ``out`` (created; must not exist or be empty)."""
    t0 = time.perf_counter()
    opts = opts or Options()
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MLXExportError(f"{out}: output directory exists and is not empty")
    outputs.claim(out, sources=[src])     # the output rule (v4convert.outputs): never inside the source, scratch ours
    with Checkpoint.open(src) as ck:
        if MLX_LM_MODELS.get(ck.family) is None:
            raise MLXExportError(f"{src}: {V4_REFUSAL}")
        incomplete = ck.check_complete(opts.allow_missing)   # refuse a half model (unless allowed)
        planner = _Planner(ck, opts)
        modules = planner.modules()
        planned = [t for m in modules for t in _planned(m)]
        groups = group_in_order(planned, [t.nbytes for t in planned], opts.shard_bytes or SHARD_BYTES)
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        total = sum(t.nbytes for t in planned)
        tmp = out.with_name(out.name + ".partial")
        outputs.remove_ours(tmp)              # a failed run's scratch (claim checked it is ours)
        tmp.mkdir(parents=True)
        outputs.write_marker(tmp, "mlx", "writing")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="mlx")
        try:
            for fname, group in zip(names, groups):
                write_streaming(tmp / fname, group, {"format": "mlx"}, bar.update if bar else None)
            cfg = {k: v for k, v in ck.config.items() if k not in ("quantization_config", "expert_dtype")}
            _rope_keys(cfg)
            qcfg = planner.quantization_config()
            if qcfg is not None:
                cfg["quantization"] = qcfg
                cfg["quantization_config"] = qcfg
            cfg["torch_dtype"] = opts.dtype
            cfg["v4convert_artifact"] = "mlx"
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            index = {"metadata": {"total_size": total},
                     "weight_map": {t.name: fname for fname, g in zip(names, groups) for t in g}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            for f in COPY_FILES:
                if (ck.root / f).is_file():
                    shutil.copy(ck.root / f, tmp / f)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bar:
                bar.close()
        outputs.write_marker(tmp, "mlx", "complete", **incomplete)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    notes = planner.notes
    if planner.repacked:
        notes.insert(0, f"{planner.repacked} stacked expert tensors re-packed losslessly from MXFP4")
    return ExportResult([out / f for f in names], len(planned), total, time.perf_counter() - t0, notes,
                        label="mlx-lm model")


# the exporter contract's name
export = export_mlx
