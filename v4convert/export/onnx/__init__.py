"""``export --onnx``: DeepSeek checkpoints -> an onnxruntime model (``model.onnx`` + ``model.onnx.data``).

The graph is built directly with ``onnx.helper`` (``torch.onnx.export`` fails on, or silently drops experts of,
data-dependent MoE routing). Weights stream tensor by tensor into the external data file; the graph itself is a
few hundred KB. The export directory is built as ``DIR.partial`` and swapped in when complete
(``v4convert.outputs``), so no ``DIR/model.onnx`` exists unless it is complete. Every unsupported combination is
refused before any file is written.

Family support: ``deepseek_v3`` (V3, R1, V3.1) and ``deepseek_v32`` (plus the lightning indexer and top-k sparse
attention from standard ops) — see ``v3.py`` for the graph; ``deepseek_v4`` (hyper-connections, sliding window and
compressed attention with sinks, hash routing) — see ``v4.py``.

The exporter contract of ``v4convert.export``: :class:`Options` (the CLI's ``--onnx-*`` options) and :func:`export`.
"""
from __future__ import annotations

import enum
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from v4convert import outputs
from v4convert.checkpoint import Checkpoint, CheckpointError
from v4convert.errors import UserError
from v4convert.export import ExportResult
from v4convert.families.layout import LayoutError
from v4convert.families.roles import Family
from v4convert.runtime.args import ConfigError, ModelArgs
from v4convert.runtime.v4_args import V4Args

OPSET = 21                # ai.onnx opset (ReduceMean/ReduceSum with axes inputs, Range, ScatterElements)
MODEL_FILE = "model.onnx"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class OnnxExportError(UserError):
    """An input or option combination this exporter does not support (raised before any file is written)."""


class WeightType(enum.StrEnum):
    """How linear and expert weights are stored."""
    INT4 = "int4"         # MatMulNBits / QMoE 4-bit blocks, symmetric RTN (zero point 8); see quant.py
    FP32 = "fp32"         # exact dequantized weights, float32 MatMul (reference export)


BLOCK_SIZES = (16, 32, 64, 128)     # block sizes along K that MatMulNBits / QMoE accept


@dataclass
class Options:
    """``export --onnx`` options (the CLI spells them ``--onnx-weights``, ``--onnx-block-size``,
    ``--onnx-accuracy-level``)."""
    weights: WeightType = field(default=WeightType.INT4, metadata={
        "cli": "--onnx-weights", "choices": [w.value for w in WeightType],
        "help": "int4: 4-bit MatMulNBits for attention/dense/shared linears and QMoE for routed experts "
                "(router, embedding, head and the absorbed kv_b stay FP32); fp32: every weight exact in FP32."})
    block_size: int = field(default=32, metadata={
        "cli": "--onnx-block-size",
        "help": "int4 block size along K (16, 32, 64 or 128; hidden and moe_intermediate sizes must be multiples)."})
    accuracy_level: int = field(default=0, metadata={
        "cli": "--onnx-accuracy-level",
        "help": "MatMulNBits/QMoE accuracy_level: 0 keeps FP32 activations (exact); 4 lets onnxruntime quantize "
                "activations to int8 (faster on CPU, less accurate)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a previous v4convert ONNX export in --out once the new one is complete; a directory "
                "v4convert did not write is never replaced (v4convert.outputs)."})

    def __post_init__(self) -> None:
        if not isinstance(self.weights, WeightType):       # the CLI and the API may pass the name
            try:
                self.weights = WeightType(str(self.weights).lower())
            except ValueError:
                raise OnnxExportError(f"--onnx-weights {self.weights}: not one of "
                                      f"{', '.join(w.value for w in WeightType)}") from None


def int4_reference_weights(ck: Checkpoint, block: int):
    """Yield ``(runtime parameter name, float32 weight)`` for every tensor an int4 export quantizes: exactly the
    values onnxruntime computes with (``(q - 8) * scale``). Assign them into our runtime (``load(ck.root)``) to get
    the reference model of the same 4-bit weights."""
    from v4convert.runtime.deepseek_v4 import model_name

    from .quant import fake_quant_int4
    from .v3 import INT4_ROLES
    from .v4 import V4_INT4_ROLES
    v4 = ck.family is Family.V4
    roles = V4_INT4_ROLES if v4 else INT4_ROLES
    for info in ck.infos():
        if info.role in roles and not info.mtp:
            yield (model_name(info.name) if v4 else info.name), fake_quant_int4(ck.dequantize(info.name), block)


def _check(ck: Checkpoint, opts: Options) -> ModelArgs:
    """All refusals happen here, before any output file exists."""
    src = str(ck.root / "config.json")
    try:
        a = V4Args.from_config(ck.config, src) if ck.family is Family.V4 else ModelArgs.from_config(ck.config, src)
    except ConfigError as e:
        raise OnnxExportError(str(e)) from None
    if opts.accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxExportError(f"accuracy_level must be 0..4, got {opts.accuracy_level}")
    ar = a.arch
    if opts.weights is WeightType.INT4:
        b = opts.block_size
        if b not in BLOCK_SIZES:
            raise OnnxExportError(f"block size {b} is not supported by MatMulNBits/QMoE (16, 32, 64 or 128)")
        for what, n in (("hidden_size", ar.hidden), ("moe_intermediate_size", ar.moe_inter)):
            if n % b:
                raise OnnxExportError(f"{src}: QMoE int4 needs {what} ({n}) to be a multiple of the block size {b}")
    rope = a.rope_dim if ck.family is Family.V4 else ar.rope
    if rope % 2:
        raise OnnxExportError(f"{src}: qk_rope_head_dim {rope} must be even")
    missing = [s for s in ck.missing() if not s.mtp]
    if missing:
        raise OnnxExportError(f"{src}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0].name}")
    return a


def export(src: Path, out: Path, opts: Options, *, progress: bool = False) -> ExportResult:
    """Write ``out/model.onnx`` (+ ``model.onnx.data``, config and tokenizer files) from checkpoint ``src``.

    ``out`` is a directory; ``DIR/NAME.onnx`` names the model file inside directory ``DIR``. The directory follows
    ``v4convert.outputs``' rule: built in ``DIR.partial`` and swapped in when complete; an existing export of ours is
    replaced only with ``overwrite``; anything else (a source, a directory we did not write) is refused.
    ``ExportResult.n_bytes`` counts the source tensor bytes read.
    """
    import onnx                 # imported on use: the CLI reads Options of every exporter at start-up
    from onnx import helper

    from .graph import ExternalData
    from .v3 import V3Graph
    from .v4 import V4Graph

    t0 = time.perf_counter()
    out = Path(out)
    out_dir, model_name = (out.parent, out.name) if out.suffix == ".onnx" else (out, MODEL_FILE)
    outputs.recover(out_dir)
    try:
        ck = Checkpoint.open(src)
    except (CheckpointError, LayoutError) as e:
        raise OnnxExportError(str(e)) from None
    try:
        _check(ck, opts)
        outputs.claim(out_dir, sources=[ck.root], overwrite=opts.overwrite)
        work = outputs.partial_path(out_dir)
        outputs.remove_ours(work)                     # a killed run's scratch (claim checked it is ours)
        work.mkdir(parents=True)
        outputs.write_marker(work, "onnx", "writing")
        data_name = model_name + ".data"
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ck.names()), unit="tensor", desc="export onnx")
        data = ExternalData(work / data_name, data_name)
        try:
            b = (V4Graph if ck.family is Family.V4 else V3Graph)(ck, data, opts.weights is WeightType.INT4, opts.block_size, opts.accuracy_level,
                        tick=(lambda n: bar.update(1)) if bar else (lambda n: None))
            inputs, outs = b.build()
            data.close()
            graph = helper.make_graph(b.g.nodes, ck.family.value, inputs, outs, initializer=b.g.initializers)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                            helper.make_opsetid("com.microsoft", 1)],
                                      producer_name="v4convert")
            model.ir_version = 10
            onnx.save_model(model, work / model_name)
            names = [model_name, data_name]
            for name in COPIED:
                if (ck.root / name).is_file():
                    shutil.copyfile(ck.root / name, work / name)
                    names.append(name)
            meta = {"format": "v4convert-onnx", "family": ck.family.value, "weights": opts.weights.value,
                    "block_size": opts.block_size, "n_layers": b.a.arch.n_layers, "vocab_size": b.a.arch.vocab}
            names.append(Path(model_name).stem + ".v4convert.json")
            (work / names[-1]).write_text(json.dumps(meta, indent=2))
            outputs.write_marker(work, "onnx", "complete", model=model_name)
        except BaseException:
            if not data.f.closed:
                data.f.close()
            shutil.rmtree(work, ignore_errors=True)   # nothing of this run is kept (an export does not resume)
            raise
        finally:
            if bar:
                bar.close()
        outputs.swap_in(work, out_dir)
        paths = [outputs.absolute(out_dir) / n for n in names]
        n_mtp = b.a.arch.n_mtp
        v4 = ck.family is Family.V4
        notes = [f"{data.n_tensors} external tensors; weights {opts.weights.value}"
                 + (f" block {opts.block_size}" if opts.weights is WeightType.INT4 else ""),
                 ("KV cache: past_key_values.N.key = the shared K=V head plus raw compressor projections "
                  "(full history; compressed entries recomputed per call)" if v4 else
                  "KV cache: one latent head per layer past_key_values.N.key / present.N.key [B, 1, S, "
                  f"{b.a.arch.kv_lora + b.a.arch.rope}] (no .value tensors: absorbed MLA reads the latent for both)"),
                 ("no genai_config.json: onnxruntime-genai needs a past/present value cache of the key's head size "
                  "and a model type it knows; this graph has other caches")]
        if v4 and opts.weights is WeightType.INT4 and ck.arch.expert_storage.value == "mxfp4":
            notes.append("MXFP4 experts re-quantized to int4 RTN (onnxruntime CPU QMoE has no fp4 kernel): lossy")
        if n_mtp:
            notes.append(f"{n_mtp} MTP block(s) not exported (the graph never runs them)")
        if opts.weights is WeightType.INT4:
            notes.append("routed experts: QMoE router_weights carry DeepSeek's weights; exact on onnxruntime CPU "
                         "(the CUDA QMoE kernel ignores router_weights)")
        return ExportResult(paths, data.n_tensors, b.bytes_read, time.perf_counter() - t0, notes,
                            label=f"{ck.family.value} ONNX")
    finally:
        ck.close()
