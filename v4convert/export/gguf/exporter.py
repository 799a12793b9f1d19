"""``v4convert export CKPT --gguf``: a DeepSeek checkpoint (as published, or our FP4 artifact) -> GGUF.

Reads tensors one at a time from the checkpoint, maps each role to llama.cpp's tensor name
(``export/gguf/names.py``), picks its GGML type from the type mix, quantizes (``formats.gguf_quants``) or
re-packs MXFP4 losslessly, and streams the file (``formats.gguf_writer``). Metadata keys follow
llama.cpp's loaders (``src/models/deepseek2.cpp``, ``deepseek32.cpp``, ``deepseek4.cpp``) and its
converter (``conversion/deepseek.py``); the tokenizer comes from ``tokenizer.json`` /
``tokenizer_config.json``. An Ollama ``Modelfile`` is written beside the GGUF.

``gguf_as_checkpoint`` goes the other way (GGUF values, dequantized by gguf-py, back under the
checkpoint's names) so our runtime can run exactly the weights llama.cpp runs.
"""
from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT, LlamaFileType

from v4convert.formats import gguf_quants
from v4convert.export.gguf.names import Entry, GGUFArch, Kind, Precision, entry
from v4convert.formats.gguf_writer import Metadata, TensorSpec, write_gguf

from v4convert.checkpoint import Checkpoint, TensorInfo
from v4convert.families.roles import Family, Role, Storage
from v4convert.errors import UserError, read_json


class ExportError(UserError):
    """A checkpoint or option the GGUF exporter cannot honour (message names the file/tensor)."""


class GGUFType(enum.Enum):
    """Types ``--type`` / ``--expert-type`` accept. Written by us: F32..MXFP4; the rest by llama.cpp's
    own quantizer (``llama_model_quantize``) on a file we write first."""
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    MXFP4 = "MXFP4"

    @property
    def qtype(self) -> Q:
        return Q[self.value]

    @property
    def bits(self) -> float:
        bs, ts = gguf_quants.block_bytes(self.qtype)
        return ts * 8 / bs


class LlamaQuant(enum.Enum):
    """``--type`` values written by llama.cpp's own quantizer (``llama_model_quantize``): K-quants and IQ4_XS
    (the lower IQ types need an importance matrix). Value = llama.cpp's ``llama_ftype``."""
    Q2_K = LlamaFileType.MOSTLY_Q2_K
    Q3_K_S = LlamaFileType.MOSTLY_Q3_K_S
    Q3_K_M = LlamaFileType.MOSTLY_Q3_K_M
    Q3_K_L = LlamaFileType.MOSTLY_Q3_K_L
    Q4_K_S = LlamaFileType.MOSTLY_Q4_K_S
    Q4_K_M = LlamaFileType.MOSTLY_Q4_K_M
    Q5_K_S = LlamaFileType.MOSTLY_Q5_K_S
    Q5_K_M = LlamaFileType.MOSTLY_Q5_K_M
    Q6_K = LlamaFileType.MOSTLY_Q6_K
    IQ4_XS = LlamaFileType.MOSTLY_IQ4_XS


# Tensors llama.cpp's quantizer must leave in the type we wrote (regexes over GGUF names; a pin to the
# tensor's current type makes llama.cpp copy it): V4 hyper-connections, APEs and indexer weights stay F32
# (its quantizer only exempts those for other archs), MLA k_b / v_b keep 8 bits.
LLAMA_PINS_F32 = (r"(^|\.)hc_", r"^output_hc_", r"compressor_ape", r"indexer\.proj", r"attn_sinks")
LLAMA_PIN_KV_B = r"attn_[kv]_b\.weight"
LLAMA_PIN_EXPERTS = r"ffn_(gate|up|down)_exps\.weight"


def llama_quantize(src: Path, dst: Path, ftype: LlamaQuant, pins: list[tuple[str, Q]], threads: int = 0) -> None:
    """Run llama.cpp's ``llama_model_quantize`` on ``src`` -> ``dst`` with per-tensor type pins."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--type {ftype.name} is written by llama.cpp's quantizer: install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype.value)
    params.nthread = threads
    patterns = [p.encode() for p, _ in pins]          # kept alive for the call
    table = (llama_cpp.llama_model_tensor_override * (len(pins) + 1))()
    for i, ((_, q), pat) in enumerate(zip(pins, patterns)):
        table[i].pattern = pat
        table[i].type = int(q)
    table[len(pins)].pattern = None
    params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"{src}: llama.cpp's quantizer failed (code {rc}) for {ftype.name}")


ARCH_OF: dict[Family, GGUFArch] = {Family.V3: GGUFArch.DEEPSEEK2, Family.V32: GGUFArch.DEEPSEEK32,
                                   Family.V4: GGUFArch.DEEPSEEK4}
# llama.cpp expert_gating_func (llama-hparams.h LLAMA_EXPERT_GATING_FUNC_TYPE_*); missing means softmax.
GATING = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5   # llama_token_type


@dataclass(frozen=True)
class TypeMix:
    """GGML type per ``Precision`` class: ``main`` for attention / shared experts / dense MLP / embed /
    head, ``expert`` for routed experts; norms, router and other small float tensors stay F32; MLA's
    3-D ``attn_k_b`` / ``attn_v_b`` never go below 8 bits (Q8_0)."""
    main: GGUFType = GGUFType.Q8_0
    expert: GGUFType = GGUFType.MXFP4
    mla: GGUFType | None = None          # type of k_b / v_b if not derived from ``main``

    def resolve(self, e: Entry, row_len: int) -> Q:
        p = e.precision
        if p is Precision.FLOAT:
            return Q.F32
        if p is Precision.INT:
            return Q.I32
        t = self.expert if p is Precision.EXPERT else self.main
        if p is Precision.MAIN_8BIT:
            t = self.mla or (GGUFType.Q8_0 if t.bits < 8 else t)
        q = t.qtype
        if row_len % gguf_quants.block_bytes(q)[0] != 0:       # rows not made of whole blocks
            q = Q.F16 if t in (GGUFType.Q8_0, GGUFType.Q4_0, GGUFType.MXFP4) else q
        return q

    def file_type(self) -> LlamaFileType:
        by_main = {GGUFType.F32: LlamaFileType.ALL_F32, GGUFType.F16: LlamaFileType.MOSTLY_F16,
                   GGUFType.BF16: LlamaFileType.MOSTLY_BF16, GGUFType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
                   GGUFType.Q4_0: LlamaFileType.MOSTLY_Q4_0, GGUFType.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE}
        if self.expert is GGUFType.MXFP4:
            return LlamaFileType.MOSTLY_MXFP4_MOE
        return by_main[self.main]


@dataclass
class ExportResult:
    paths: list[Path]
    arch: GGUFArch
    n_tensors: int
    n_bytes: int
    seconds: float
    repacked: list[str] = field(default_factory=list)      # GGUF tensors re-packed losslessly from MXFP4
    skipped: list[str] = field(default_factory=list)       # checkpoint tensors llama.cpp has no place for
    modelfile: Path | None = None


# ------------------------------------------------------------------------------------------ metadata
def _rope(cfg: dict) -> tuple[float, dict]:
    """``(rope_theta, scaling dict)`` from the published keys (``rope_theta`` + ``rope_scaling``) or
    transformers 5's flat ``rope_parameters`` (``{"rope_type", "rope_theta", "factor", ...}``)."""
    rp = cfg.get("rope_parameters")
    flat = rp if isinstance(rp, dict) and "rope_theta" in rp else {}
    theta = cfg.get("rope_theta", flat.get("rope_theta", 10000.0))
    return float(theta), (cfg.get("rope_scaling") or flat or {})


# Router scoring when the config omits ``scoring_func`` (transformers 5 drops it): the family's own.
DEFAULT_SCORING = {Family.V3: "sigmoid", Family.V32: "sigmoid", Family.V4: "sqrtsoftplus"}


def _yarn(md: Metadata, arch: str, cfg: dict, log_mul: bool) -> None:
    rs = _rope(cfg)[1]
    kind = rs.get("rope_type", rs.get("type"))
    if kind is None or rs.get("factor") is None:
        return
    if kind != "yarn":
        raise ExportError(f"config.json: rope_scaling type {kind!r} is not supported for DeepSeek GGUF (yarn only)")
    md.str(f"{arch}.rope.scaling.type", "yarn")
    md.f32(f"{arch}.rope.scaling.factor", rs["factor"])
    md.u32(f"{arch}.rope.scaling.original_context_length", rs["original_max_position_embeddings"])
    if rs.get("beta_fast") is not None:
        md.f32(f"{arch}.rope.scaling.yarn_beta_fast", rs["beta_fast"])
    if rs.get("beta_slow") is not None:
        md.f32(f"{arch}.rope.scaling.yarn_beta_slow", rs["beta_slow"])
    if log_mul and rs.get("mscale_all_dim") is not None:
        # llama.cpp divides this by 0.1 on load ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
        md.f32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * rs["mscale_all_dim"])


def build_metadata(ck: Checkpoint, arch: GGUFArch, mix: TypeMix, n_mtp: int, name: str) -> Metadata:
    """Model metadata (without tokenizer) exactly as llama.cpp's loader of ``arch`` reads it."""
    cfg, a = ck.config, ck.arch
    A = arch.value
    md = Metadata()
    md.str("general.architecture", A)
    md.str("general.name", name)
    md.u32("general.file_type", int(mix.file_type()))
    md.u32("general.quantization_version", 2)
    md.u32(f"{A}.block_count", a.n_layers + n_mtp)
    md.u32(f"{A}.context_length", cfg.get("max_position_embeddings", 4096))
    md.u32(f"{A}.embedding_length", a.hidden)
    md.u32(f"{A}.vocab_size", a.vocab)
    md.u32(f"{A}.attention.head_count", a.n_heads)
    md.f32(f"{A}.rope.freq_base", _rope(cfg)[0])
    md.f32(f"{A}.attention.layer_norm_rms_epsilon", cfg.get("rms_norm_eps", 1e-6))
    md.u32(f"{A}.expert_count", a.n_experts)
    md.u32(f"{A}.expert_used_count", a.top_k)
    if cfg.get("n_group"):
        md.u32(f"{A}.expert_group_count", cfg["n_group"])
        md.u32(f"{A}.expert_group_used_count", cfg["topk_group"])
    score = cfg.get("scoring_func") or DEFAULT_SCORING[a.family]
    if score not in GATING:
        raise ExportError(f"config.json: scoring_func {score!r} has no llama.cpp gating function")
    md.u32(f"{A}.expert_gating_func", GATING[score])
    md.u32(f"{A}.expert_feed_forward_length", a.moe_inter)
    md.u32(f"{A}.expert_shared_count", a.n_shared)
    md.f32(f"{A}.expert_weights_scale", cfg.get("routed_scaling_factor", 1.0))
    md.bool(f"{A}.expert_weights_norm", bool(cfg.get("norm_topk_prob", False)))
    md.u32(f"{A}.attention.q_lora_rank", a.q_lora)
    if n_mtp:
        md.u32(f"{A}.nextn_predict_layers", n_mtp)
    if arch is GGUFArch.DEEPSEEK4:
        _v4_metadata(md, A, cfg, a)
        return md
    # MLA as MQA with one 576-wide head (absorbed) and the decompressed MHA sizes (deepseek2.cpp)
    md.u32(f"{A}.feed_forward_length", a.inter)
    md.u32(f"{A}.leading_dense_block_count", a.first_dense)
    md.u32(f"{A}.attention.head_count_kv", 1)
    md.u32(f"{A}.attention.kv_lora_rank", a.kv_lora)
    md.u32(f"{A}.attention.key_length", a.kv_lora + a.rope)
    md.u32(f"{A}.attention.value_length", a.kv_lora)
    md.u32(f"{A}.attention.key_length_mla", a.nope + a.rope)
    md.u32(f"{A}.attention.value_length_mla", a.v_head)
    md.u32(f"{A}.rope.dimension_count", a.rope)
    _yarn(md, A, cfg, log_mul=True)
    if arch is GGUFArch.DEEPSEEK32:
        md.u32(f"{A}.attention.indexer.head_count", a.index_heads)
        md.u32(f"{A}.attention.indexer.key_length", a.index_dim)
        md.u32(f"{A}.attention.indexer.top_k", cfg["index_topk"])
    return md


def _v4_metadata(md: Metadata, A: str, cfg: dict, a) -> None:
    n_blocks = a.n_layers                    # MTP is not part of the main GGUF for deepseek4
    md.u32(f"{A}.attention.head_count_kv", cfg.get("num_key_value_heads", 1))
    md.u32(f"{A}.attention.key_length", a.head_dim)
    md.u32(f"{A}.attention.value_length", a.head_dim)
    md.u32(f"{A}.rope.dimension_count", cfg["qk_rope_head_dim"])
    md.u32(f"{A}.attention.sliding_window", cfg["sliding_window"])
    limit = float(cfg.get("swiglu_limit", 0.0))
    md.arr(f"{A}.swiglu_clamp_exp", [limit] * n_blocks, VT.FLOAT32)
    md.arr(f"{A}.swiglu_clamp_shexp", [limit] * n_blocks, VT.FLOAT32)
    md.u32(f"{A}.attention.indexer.head_count", a.index_heads)
    md.u32(f"{A}.attention.indexer.key_length", a.index_dim)
    md.u32(f"{A}.attention.indexer.top_k", cfg["index_topk"])
    md.u32(f"{A}.attention.output_group_count", a.o_groups)
    md.u32(f"{A}.attention.output_lora_rank", a.o_lora)
    md.arr(f"{A}.attention.compress_ratios", list(a.compress_ratios), VT.INT32)
    md.f32(f"{A}.attention.compress_rope_freq_base", cfg.get("compress_rope_theta", cfg.get("rope_theta", 10000.0)))
    md.u32(f"{A}.hyper_connection.count", a.hc_mult)
    md.u32(f"{A}.hyper_connection.sinkhorn_iterations", cfg["hc_sinkhorn_iters"])
    md.f32(f"{A}.hyper_connection.epsilon", cfg["hc_eps"])
    md.u32(f"{A}.hash_layer_count", a.n_hash)
    md.u32(f"{A}.embedding_length_out", a.hidden * a.hc_mult)
    _yarn(md, A, cfg, log_mul=False)


def add_tokenizer(md: Metadata, root: Path, n_vocab: int) -> dict:
    """GGUF ``gpt2`` tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json``); returns the special tokens.

    Ids the tokenizer lacks up to ``n_vocab`` (the embedding rows) become ``[PAD{id}]`` UNUSED tokens, as
    llama.cpp's converter does; added special tokens are CONTROL, other added tokens USER_DEFINED.
    """
    tj_path = root / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(f"{root}: no tokenizer.json (GGUF needs the tokenizer)")
    tj = read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{tj_path}: tokenizer model {model.get('type')!r} is not BPE")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: TOKEN_NORMAL for i in id_to_tok}
    for at in tj.get("added_tokens", []):
        id_to_tok[int(at["id"])] = at["content"]
        types[int(at["id"])] = TOKEN_CONTROL if at.get("special") else TOKEN_USER_DEFINED
    if id_to_tok and max(id_to_tok) >= n_vocab:
        raise ExportError(f"{tj_path}: token id {max(id_to_tok)} >= vocab_size {n_vocab} of config.json")
    tokens = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    ttypes = [types.get(i, TOKEN_UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md.str("tokenizer.ggml.model", "gpt2")
    md.str("tokenizer.ggml.pre", "deepseek-v3")
    md.arr("tokenizer.ggml.tokens", tokens, VT.STRING)
    md.arr("tokenizer.ggml.token_type", ttypes, VT.INT32)
    md.arr("tokenizer.ggml.merges", merges, VT.STRING)
    tc_path = root / "tokenizer_config.json"
    tc = read_json(tc_path) if tc_path.is_file() else {}
    tok_to_id = {t: i for i, t in enumerate(tokens)}
    special: dict[str, str] = {}
    for key, gkey in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok is None:
            continue
        if tok not in tok_to_id:
            raise ExportError(f"{tc_path}: {key} {tok!r} is not in tokenizer.json")
        md.u32(f"tokenizer.ggml.{gkey}", tok_to_id[tok])
        special[key] = tok
    md.bool("tokenizer.ggml.add_bos_token", bool(tc.get("add_bos_token", True)))
    md.bool("tokenizer.ggml.add_eos_token", bool(tc.get("add_eos_token", False)))
    tmpl = tc.get("chat_template")
    if isinstance(tmpl, list):      # named templates: keep the default one
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    if tmpl:
        md.str("tokenizer.chat_template", tmpl)
    return special


def modelfile_text(gguf_name: str, special: dict[str, str], gen: dict) -> str:
    """Ollama ``Modelfile`` for the DeepSeek chat format (``<｜User｜>`` / ``<｜Assistant｜>``)."""
    eos = special.get("eos_token", "<｜end▁of▁sentence｜>")
    lines = [f"FROM ./{gguf_name}",
             'TEMPLATE """{{- if .System }}{{ .System }}{{ end }}',
             "{{- range $i, $_ := .Messages }}",
             '{{- if eq .Role "user" }}<｜User｜>{{ .Content }}',
             '{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}' + eos,
             "{{- end }}",
             '{{- end }}<｜Assistant｜>"""',
             f'PARAMETER stop "{eos}"',
             'PARAMETER stop "<｜User｜>"']
    for k in ("temperature", "top_p"):
        if gen.get(k) is not None:
            lines.append(f"PARAMETER {k} {gen[k]}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- tensors
def skip_reason(ck: Checkpoint, info: TensorInfo, arch: GGUFArch, keep_mtp: bool) -> str | None:
    """Why a checkpoint tensor has no place in the GGUF (None: it is exported)."""
    if info.mtp and arch is GGUFArch.DEEPSEEK4:
        # llama.cpp's converter writes V4's MTP block only into a separate draft GGUF (--mtp), whose
        # root hc_head tensors replace the model's; one file cannot carry both.
        return "V4 MTP block (llama.cpp loads it only from a separate draft GGUF)"
    if info.mtp and not keep_mtp:
        return "MTP block dropped (--no-mtp)"
    if arch is GGUFArch.DEEPSEEK4 and info.role is Role.ROUTER_BIAS and info.layer is not None \
            and info.layer < ck.arch.n_hash:
        return "hash-routed layer: llama.cpp routes by tid2eid and loads no selection bias"
    return None


def _float(ck: Checkpoint, info: TensorInfo) -> torch.Tensor:
    return ck.dequantize(info.name)


def _encode(ck: Checkpoint, info: TensorInfo, q: Q) -> torch.Tensor:
    """Bytes of one checkpoint tensor in GGML type ``q``; MXFP4 sources go to MXFP4 by re-packing."""
    if q == Q.MXFP4 and info.storage is Storage.MXFP4:
        raw = ck.raw(info.name)
        return gguf_quants.repack_mxfp4(raw["weight"], raw["scale"], info.name)
    return gguf_quants.quantize(_float(ck, info), q, info.name)


def plan_tensors(ck: Checkpoint, arch: GGUFArch, mix: TypeMix, keep_mtp: bool = True
                 ) -> tuple[list[TensorSpec], list[str], list[str]]:
    """GGUF tensor specs in checkpoint order (experts stacked per layer and projection).

    Returns (specs, names re-packed losslessly from MXFP4, checkpoint names skipped with reasons).
    """
    a = ck.arch
    specs: list[TensorSpec] = []
    repacked: list[str] = []
    skipped: list[str] = []
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
            q = mix.resolve(e, in_f)
            (name,) = e.format(L)
            if q == Q.MXFP4 and all(m.storage is Storage.MXFP4 for m in members):
                repacked.append(name)
            specs.append(TensorSpec(name, (a.n_experts, out_f, in_f), q,
                                    lambda ms=members, q=q: (_encode(ck, m, q) for m in ms)))
        elif e.kind is Kind.KV_B:
            H, nope, v, r = a.n_heads, a.nope, a.v_head, info.shape[1]
            if info.shape[0] != H * (nope + v):
                raise ExportError(f"{ck.root}: tensor {info.name}: {info.shape[0]} rows, expected heads x (nope + v) "
                                  f"= {H * (nope + v)}")
            kb_name, vb_name = e.format(L)
            qk, qv = mix.resolve(e, nope), mix.resolve(e, r)

            def k_b(info=info, q=qk, H=H, nope=nope, v=v, r=r):
                w = _float(ck, info).view(H, nope + v, r)
                return gguf_quants.quantize(w[:, :nope].transpose(1, 2).contiguous(), q, info.name)

            def v_b(info=info, q=qv, H=H, nope=nope, v=v, r=r):
                w = _float(ck, info).view(H, nope + v, r)
                return gguf_quants.quantize(w[:, nope:].contiguous(), q, info.name)
            specs.append(TensorSpec(kb_name, (H, r, nope), qk, k_b))
            specs.append(TensorSpec(vb_name, (H, v, r), qv, v_b))
        elif e.kind is Kind.INT32:
            (name,) = e.format(L)
            specs.append(TensorSpec(name, info.shape, Q.I32,
                                    lambda info=info: ck.raw(info.name)["weight"].to(torch.int32)))
        else:
            (name,) = e.format(L)
            q = mix.resolve(e, info.shape[-1])
            if q == Q.MXFP4 and info.storage is Storage.MXFP4:
                repacked.append(name)
            specs.append(TensorSpec(name, info.shape, q, lambda info=info, q=q: _encode(ck, info, q)))
    return specs, repacked, skipped


def export_gguf(ckpt: str | Path, out: str | Path, mix: TypeMix = TypeMix(), *, keep_mtp: bool = True,
                split_max_size: int | None = None, progress: bool = False, modelfile: bool = True,
                name: str | None = None, llama_type: LlamaQuant | None = None) -> ExportResult:
    """Write ``ckpt`` as GGUF to ``out`` (or its ``-0000k-of-0000N`` splits); see the module docstring.

    ``llama_type``: a K-quant / IQ type for the ``main`` class, written by llama.cpp's quantizer from an
    intermediate file in which those tensors are BF16 and everything else is already final (experts in
    ``mix.expert``, k_b / v_b Q8_0, F32 tensors), pinned so llama.cpp copies them unchanged.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output file name must end in .gguf")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: output directory does not exist")
    if llama_type is not None:
        if split_max_size:
            raise ExportError("--split-max-size with a llama.cpp-quantized --type is not supported yet")
        tmp = out.with_name(out.stem + ".intermediate.gguf")
        mla = GGUFType.Q8_0                                  # K-quant / IQ main types are below 8 bits
        inter = export_gguf(ckpt, tmp, TypeMix(GGUFType.BF16, mix.expert, mla), keep_mtp=keep_mtp,
                            progress=progress, modelfile=False, name=name)
        pins = [(p, Q.F32) for p in LLAMA_PINS_F32] + [(LLAMA_PIN_KV_B, mla.qtype),
                                                       (LLAMA_PIN_EXPERTS, mix.expert.qtype)]
        try:
            llama_quantize(tmp, out, llama_type, pins)
        finally:
            tmp.unlink(missing_ok=True)
        res = ExportResult([out], inter.arch, inter.n_tensors, out.stat().st_size, time.perf_counter() - t0,
                           inter.repacked, inter.skipped, None)
        if modelfile:
            res.modelfile = _write_modelfile(ckpt, out, [out])
        return res
    with Checkpoint.open(ckpt) as ck:
        arch = ARCH_OF[ck.family]
        specs, repacked, skipped = plan_tensors(ck, arch, mix, keep_mtp)
        n_mtp = len({int(s.name.split(".")[1]) for s in specs
                     if s.name.startswith("blk.") and int(s.name.split(".")[1]) >= ck.arch.n_layers})
        md = build_metadata(ck, arch, mix, n_mtp, name or Path(ckpt).resolve().name)
        special = add_tokenizer(md, ck.root, ck.arch.vocab)
        total = sum(s.nbytes for s in specs)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {arch.value}")
        try:
            paths = write_gguf(out, md, specs, split_max_size, bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        mf = _write_modelfile(ck.root, out, paths, special) if modelfile else None
    return ExportResult(paths, arch, len(specs), total, time.perf_counter() - t0, repacked, skipped, mf)


def _write_modelfile(root: str | Path, out: Path, paths: list[Path], special: dict[str, str] | None = None) -> Path:
    root = Path(root)
    if special is None:
        tc_path = root / "tokenizer_config.json"
        tc = read_json(tc_path) if tc_path.is_file() else {}
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tc.items()
                   if k in ("bos_token", "eos_token") and v is not None}
    gen_path = root / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    mf = out.with_name("Modelfile")
    mf.write_text(modelfile_text(paths[0].name, special, gen), encoding="utf-8")
    return mf


# ------------------------------------------------------------------------------ GGUF -> checkpoint
def read_gguf_tensors(paths: list[Path]) -> dict[str, tuple[np.ndarray, Q]]:
    """name -> (raw data as stored, GGML type) over all splits (memory-mapped by gguf-py's reader)."""
    from gguf import GGUFReader
    out: dict[str, tuple[np.ndarray, Q]] = {}
    for p in paths:
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
