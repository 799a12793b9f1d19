"""GGUF export: metadata keys per arch (llama.cpp's loaders), tokenizer and the Ollama Modelfile."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gguf import GGUFValueType as VT

from v4convert.export.gguf.names import GGUFArch
from v4convert.formats.gguf_writer import Metadata

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import RELEASE_ROUTING
from v4convert import __version__, outputs
from v4convert.paths import read_checkpoint_json
from .types import ARCH_OF, GATING, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, ExportError, TypeMix  # noqa: F401


# ------------------------------------------------------------------------------------------ metadata
def _rope(cfg: dict) -> tuple[float, dict]:
    """``(rope_theta, scaling dict)`` from the published keys (``rope_theta`` + ``rope_scaling``) or
    transformers 5's flat ``rope_parameters`` (``{"rope_type", "rope_theta", "factor", ...}``)."""
    rp = cfg.get("rope_parameters")
    flat = rp if isinstance(rp, dict) and "rope_theta" in rp else {}
    theta = cfg.get("rope_theta", flat.get("rope_theta", 10000.0))
    return float(theta), (cfg.get("rope_scaling") or flat or {})


# Router scoring when the config omits ``scoring_func`` (transformers 5 drops it): the family's own.
DEFAULT_SCORING = {f: r["scoring_func"] for f, r in RELEASE_ROUTING.items()}


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
    md.str(outputs.GGUF_MARKER_KEY, __version__)      # marks the file as ours (outputs.is_ours)
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


# llama.cpp's pre-tokenizer (``tokenizer.ggml.pre``, src/llama-vocab.cpp) per ``tokenizer.json`` ``pre_tokenizer``:
# (name, test). DeepSeek-V3's release (R1, V3.1, V3.2 share it): a Sequence of Split regexes (digits in runs of 1-3, a CJK
# run, then the word/punctuation pattern) and ByteLevel without its own regex; our trained tiny models and synth
# tokenizers: plain ByteLevel with GPT-2's regex. llama.cpp would split text differently under the wrong name.
def _deepseek_v3(pt: dict) -> bool:
    parts = (pt.get("pretokenizers") or []) if pt.get("type") == "Sequence" else []
    rx = [str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split"]
    last = parts[-1] if parts else {}
    return (len(rx) == 3 and rx[0] == r"\p{N}{1,3}" and rx[1].startswith("[\u4e00-\u9fa5")
            and last.get("type") == "ByteLevel" and last.get("use_regex") is False)


PRE_TOKENIZERS: tuple[tuple[str, Callable[[dict], bool]], ...] = (
    ("deepseek-v3", _deepseek_v3),
    ("gpt-2", lambda pt: pt.get("type") == "ByteLevel" and pt.get("use_regex", True) is True),
)


def pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` ``pre_tokenizer`` (``PRE_TOKENIZERS``)."""
    for name, test in PRE_TOKENIZERS:
        if isinstance(pre, dict) and test(pre):
            return name
    kind = pre.get("type") if isinstance(pre, dict) else pre
    raise ExportError(f"{path}: pre_tokenizer {kind!r} is not one llama.cpp knows for DeepSeek (DeepSeek-V3's Split "
                      f"sequence or GPT-2's ByteLevel); llama.cpp would tokenize text differently")


def add_tokenizer(md: Metadata, root: Path, n_vocab: int) -> dict:
    """GGUF ``gpt2`` tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json``); returns the special tokens.

    Ids the tokenizer lacks up to ``n_vocab`` (the embedding rows) become ``[PAD{id}]`` UNUSED tokens, as
    llama.cpp's converter does; added special tokens are CONTROL, other added tokens USER_DEFINED.
    """
    tj_path = root / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(f"{root}: no tokenizer.json (GGUF needs the tokenizer)")
    tj = read_checkpoint_json(root, tj_path.name)
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
    md.str("tokenizer.ggml.pre", pre_tokenizer_name(tj.get("pre_tokenizer"), tj_path))
    md.arr("tokenizer.ggml.tokens", tokens, VT.STRING)
    md.arr("tokenizer.ggml.token_type", ttypes, VT.INT32)
    md.arr("tokenizer.ggml.merges", merges, VT.STRING)
    tc_path = root / "tokenizer_config.json"
    tc = read_checkpoint_json(root, tc_path.name) if tc_path.is_file() else {}
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
    lines = [outputs.MODELFILE_MARK, f"FROM ./{gguf_name}",
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


def _write_modelfile(root: str | Path, out: Path, paths: list[Path], special: dict[str, str] | None = None) -> Path:
    root = Path(root)
    if special is None:
        tc_path = root / "tokenizer_config.json"
        tc = read_checkpoint_json(root, tc_path.name) if tc_path.is_file() else {}
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tc.items()
                   if k in ("bos_token", "eos_token") and v is not None}
    gen_path = root / "generation_config.json"
    gen = read_checkpoint_json(root, gen_path.name) if gen_path.is_file() else {}
    mf = out.with_name("Modelfile")
    tmp = mf.with_name(mf.name + ".partial")
    tmp.write_text(modelfile_text(paths[0].name, special, gen), encoding="utf-8")
    outputs.kill_point("modelfile:written")
    os.replace(tmp, mf)                   # the old Modelfile (ours: checked by _claim) goes only now
    return mf
