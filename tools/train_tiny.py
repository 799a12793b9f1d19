"""Train the bundled tiny DeepSeek models (V3 and V4 family) on the Python standard library's sources.

DESIGN §8: random weights make accuracy numbers meaningless, so ``verify`` and ``demo`` run on small models
trained for a few minutes on real text available offline. This script makes them reproducibly:

1. ``corpus``: the top-level ``*.py`` files of this interpreter's standard library (``sysconfig`` ``stdlib``),
   sorted by name; every 10th file (sorted index % 10 == 7) is held out. The list with sha256 and split goes
   to ``data/corpus/MANIFEST.json``; the held-out text (capped at ``HELDOUT_CHARS``) to ``heldout.txt``. A
   byte-level BPE tokenizer (``tokenizers``) is trained on the training files only.
2. ``train --family v3|v4``: a transformers 5.x ``DeepseekV3ForCausalLM`` / ``DeepseekV4ForCausalLM`` in
   float32 on CPU, wall-clock budgeted, AdamW + cosine schedule, aux-loss-free router-bias balancing (the
   DeepSeek-V3 rule ``b += u * sign(mean_load - load)``), and quantization-aware finishing: in the last
   ``QAT_FRACTION`` of the budget every weight is replaced by its published-storage round trip (FP8 E4M3
   128x128 blocks, V4 experts MXFP4, BF16 for the rest) in the forward pass (straight-through estimator).
3. The trained weights are written in the family's *published* layout (``layout.inventory`` names, dtypes and
   scale tensors): V3 FP8 E4M3 + F32 ``weight_scale_inv``; V4 FP8 E4M3 + E8M0 ``.scale`` and MXFP4 experts
   (I8 + E8M0 per 32). The released checkpoint *is* the quantized one. ``train_report.json`` records
   held-out perplexity of the float model, of the released checkpoint run by ``v4convert.runtime``, and of a
   unigram baseline.

Usage: ``python tools/train_tiny.py corpus`` then ``python tools/train_tiny.py train --family v3``
(``--init-from DIR`` continues from a release; ``report --family F`` re-scores a release). The bundled
releases: tiny-v3 = one run (its report was rebuilt by ``report`` from the training log after a crash in
the final runtime check); tiny-v4 = one run plus one ``--init-from`` continuation (``continued_from``).
Needs transformers (the ``test`` extra); it sits outside the package (tools/), which never imports it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import v4convert
from v4convert.formats.fp8_block import FP8ScaleFormat, fp8_block_dequantize, fp8_block_quantize
from v4convert.formats.mxfp4 import MXScaleRule, mxfp4_dequantize, mxfp4_quantize
from v4convert.formats.safetensors_io import PlannedTensor, write_streaming

from v4convert.families.layout import Arch, Slot, canonical_name, inventory, parse_name, stored_tensors
from v4convert.families.roles import Storage
from v4convert.synth import assign_shards
from v4convert.tokenizer_data import BOS, EOS, add_bos_post_processor, write_tokenizer

DATA = Path(v4convert.__file__).parent / "data"        # the package's bundled data (written in place)
CORPUS_DIR = DATA / "corpus"
HELDOUT_EVERY, HELDOUT_AT = 10, 7          # sorted index % 10 == 7 -> held out
HELDOUT_CHARS = 160_000                     # cap of the stored held-out text (characters)
VOCAB = 1000                                # BPE vocabulary incl. 2 specials (equals no layer width)
CTX = 128                                   # training / evaluation window (tokens)
QAT_FRACTION = 0.3                          # last part of the budget trains through the published codecs
MXFP4_RULE = MXScaleRule.ROUND_UP           # V4 expert scale rule used for QAT and the release (no clipping)
BIAS_RATE = 1e-3                            # aux-loss-free balancing step (DeepSeek-V3 paper's u)
REF_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ---------------------------------------------------------------------------------------------
def stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(p.name for p in root.glob("*.py"))


def build_corpus(out: Path = CORPUS_DIR) -> dict:
    """Write MANIFEST.json, heldout.txt and tokenizer.json into ``out``; returns the manifest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root, names = stdlib_files()
    files, train_texts, held_texts = [], [], []
    for i, name in enumerate(names):
        data = (root / name).read_bytes()
        split = "heldout" if i % HELDOUT_EVERY == HELDOUT_AT else "train"
        files.append({"path": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "split": split})
        (held_texts if split == "heldout" else train_texts).append(data.decode("utf-8", errors="replace"))
    out.mkdir(parents=True, exist_ok=True)
    held = "\n".join(held_texts)[:HELDOUT_CHARS]
    (out / "heldout.txt").write_text(held, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_texts, trainer=trainer)
    add_bos_post_processor(tok)
    tok.save(str(out / "tokenizer.json"))
    manifest = {"python": sys.version.split()[0], "stdlib": str(root), "selection": "stdlib top-level *.py, sorted",
                "heldout_rule": f"sorted index % {HELDOUT_EVERY} == {HELDOUT_AT}",
                "heldout_txt_chars": len(held), "heldout_txt_sha256": hashlib.sha256(held.encode()).hexdigest(),
                "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(),
                              "trained_on": "train split"},
                "files": files}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def load_tokens(split: str, corpus: Path = CORPUS_DIR) -> torch.Tensor:
    """Token ids of the training files (each followed by EOS) re-read from the stdlib, checked against the
    manifest's sha256, or of ``heldout.txt``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    if split == "heldout":
        return torch.tensor(tok.encode((corpus / "heldout.txt").read_text(encoding="utf-8"),
                                       add_special_tokens=False).ids, dtype=torch.long)
    man = json.loads((corpus / "MANIFEST.json").read_text())
    root = Path(man["stdlib"])
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for f in man["files"]:
        if f["split"] != "train":
            continue
        data = (root / f["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise SystemExit(f"{root / f['path']}: sha256 differs from {corpus / 'MANIFEST.json'} (other Python?)")
        ids += tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def unigram_ppl(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies of ``train`` on ``held`` (positions 1..)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(torch.exp(-logp[held[1:]].mean()))


# ---------------------------------------------------------------------------------------------
# Model configs (transformers 5.24 classes; the released config.json is written in published style)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinySpec:
    hf_kwargs: dict
    published: dict       # config.json keys as DeepSeek publishes them (merged over the transformers config)


def v3_spec() -> TinySpec:
    kw = dict(vocab_size=VOCAB, hidden_size=192, intermediate_size=384, moe_intermediate_size=96,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
              q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
              n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=1,
              routed_scaling_factor=2.5, max_position_embeddings=1024, num_nextn_predict_layers=0,
              rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    # DeepSeek's release routing keys (transformers 5 drops them; vLLM reads them to build the router)
    return TinySpec(kw, {"quantization_config": dict(REF_QUANT), "topk_method": "noaux_tc",
                         "scoring_func": "sigmoid"})


V4_LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                  "compressed_sparse_attention"]
V4_RATES = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 16}


def v4_spec() -> TinySpec:
    kw = dict(vocab_size=VOCAB, hidden_size=192, moe_intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=96, o_groups=2, o_lora_rank=48,
              n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, hc_mult=4, index_n_heads=4,
              index_head_dim=32, index_topk=8, sliding_window=32, layer_types=V4_LAYER_TYPES,
              mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
              compress_rates={k: v for k, v in V4_RATES.items() if v}, num_nextn_predict_layers=0,
              max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
              tie_word_embeddings=False)
    pub = {"compress_ratios": [V4_RATES[t] for t in V4_LAYER_TYPES], "num_hash_layers": 1,
           "quantization_config": dict(REF_QUANT, scale_fmt="ue8m0"), "expert_dtype": "fp4",
           "topk_method": "noaux_tc"}
    return TinySpec(kw, pub)


SPECS = {"v3": v3_spec, "v4": v4_spec}


def init_from_release(model, arch: Arch, ckpt: Path):
    """A model whose weights are a released checkpoint's values (dequantized), loaded by transformers itself:
    ``save_pretrained`` gives the file names and layout, whose tensors are replaced by the release's."""
    from safetensors.torch import load_file, save_file

    from v4convert.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory() as d, Checkpoint.open(ckpt) as ck:
        model.save_pretrained(d)
        for f in sorted(Path(d).glob("*.safetensors")):
            t = load_file(str(f))
            for name in t:
                canon = canonical_name(arch, name)
                src = ck.raw(canon)["weight"] if t[name].dtype == torch.int64 else ck.dequantize(canon)
                if tuple(src.shape) != tuple(t[name].shape):
                    raise RuntimeError(f"{ckpt}: {canon} has shape {tuple(src.shape)}, model needs {tuple(t[name].shape)}")
                t[name] = src.to(t[name].dtype).contiguous()
            save_file(t, str(f), metadata={"format": "pt"})
        return type(model).from_pretrained(d, dtype=torch.float32)


def build_model(family: str, seed: int):
    import transformers

    spec = SPECS[family]()
    cls, cfg_cls = ((transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config) if family == "v3" else
                    (transformers.DeepseekV4ForCausalLM, transformers.DeepseekV4Config))
    torch.manual_seed(seed)
    model = cls(cfg_cls(**spec.hf_kwargs)).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):   # transformers leaves hash routes at zero: each token -> top_k experts
                e, k = spec.hf_kwargs["n_routed_experts"], spec.hf_kwargs["num_experts_per_tok"]
                b.copy_(torch.argsort(torch.rand((b.shape[0], e), generator=g), dim=-1)[:, :k])
    return model, spec


# ---------------------------------------------------------------------------------------------
# Published storage: names, fake quantization, export
# ---------------------------------------------------------------------------------------------
def published_config(model, spec: TinySpec) -> dict:
    cfg = model.config.to_dict()
    cfg.update(spec.published)
    if "compress_ratios" in spec.published:     # V4: published keys only (layout and runtime read these)
        for k in ("layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "partial_rotary_factor"):
            cfg.pop(k, None)
        cfg["qk_rope_head_dim"] = spec.hf_kwargs["qk_rope_head_dim"]
        cfg["rope_theta"] = model.config.rope_parameters["main"]["rope_theta"]
        cfg["compress_rope_theta"] = model.config.rope_parameters["compress"]["rope_theta"]
        cfg["rope_scaling"] = None
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def saved_state(model) -> dict[str, torch.Tensor]:
    """transformers' ``save_pretrained`` tensors (per-expert names), read back from a temp dir."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        out: dict[str, torch.Tensor] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
    return out


def roundtrip(w: torch.Tensor, storage: Storage, scale_dtype: str) -> torch.Tensor:
    """float32 value of ``w`` after its published storage (what the released checkpoint holds)."""
    if storage is Storage.FP8_BLOCK:
        fmt = FP8ScaleFormat.E8M0 if scale_dtype == "F8_E8M0" else FP8ScaleFormat.F32
        return fp8_block_dequantize(fp8_block_quantize(w, fmt=fmt))
    if storage is Storage.MXFP4:
        return mxfp4_dequantize(mxfp4_quantize(w, rule=MXFP4_RULE))
    if storage is Storage.BF16:
        return w.to(torch.bfloat16).float()
    return w


@dataclass
class QTarget:
    """One parameter (or a slice of a fused expert parameter) and the published storage it ends up in."""
    param: torch.nn.Parameter
    index: tuple             # slice into the parameter
    storage: Storage
    scale_dtype: str


def quant_targets(model, arch: Arch) -> list[QTarget]:
    """Match every parameter (and fused-expert slice) to its published tensor by value (random init makes
    every tensor unique), so QAT uses exactly the storage the export will use."""
    saved = saved_state(model)
    by_bytes: dict[str, Slot] = {}
    for n, t in saved.items():
        key = hashlib.sha1(t.float().contiguous().numpy().tobytes()).hexdigest()
        slot = parse_name(arch, canonical_name(arch, n))
        other = by_bytes.setdefault(key, slot)   # equal inits (norms = 1) may collide: only if storage agrees
        if other.storage is not slot.storage:
            raise RuntimeError(f"{n} and {other.name} start equal but are stored differently")
    targets: list[QTarget] = []

    def add(p: torch.nn.Parameter, index: tuple, t: torch.Tensor, pname: str) -> None:
        key = hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()
        if key not in by_bytes:
            raise RuntimeError(f"parameter {pname}{list(index)}: no saved tensor with the same values")
        slot = by_bytes[key]
        sd = stored_tensors(arch, slot)[-1][1]
        if slot.storage is not Storage.F32:
            targets.append(QTarget(p, index, slot.storage, sd))

    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):        # [E, 2I, H]: rows [:I] gate (w1), [I:] up (w3)
            half = p.shape[1] // 2
            for e in range(p.shape[0]):
                add(p, (e, slice(0, half)), p[e, :half], name)
                add(p, (e, slice(half, None)), p[e, half:], name)
        elif name.endswith("experts.down_proj"):         # [E, H, I]
            for e in range(p.shape[0]):
                add(p, (e,), p[e], name)
        else:
            add(p, (), p, name)
    return targets


def write_published(model, spec: TinySpec, out: Path, tokenizer_json: Path, shard_size: int = 4 << 20) -> Arch:
    """Quantize the trained float weights into the published layout and write a checkpoint directory."""
    cfg = published_config(model, spec)
    arch = Arch.from_config(cfg, "trained tiny config")
    saved = {canonical_name(arch, n): t for n, t in saved_state(model).items()}
    slots = list(inventory(arch))
    missing = sorted({s.name for s in slots} - set(saved))
    extra = sorted(set(saved) - {s.name for s in slots})
    if missing or extra:
        raise RuntimeError(f"published inventory mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    planned: list[PlannedTensor] = []
    for slot in slots:
        w = saved[slot.name]
        entries = stored_tensors(arch, slot)
        if slot.storage is Storage.FP8_BLOCK:
            (wn, wd, ws), (sn, sd, ss) = entries
            q = fp8_block_quantize(w, fmt=FP8ScaleFormat.E8M0 if sd == "F8_E8M0" else FP8ScaleFormat.F32,
                                   name=slot.name)
            planned += [PlannedTensor(wn, wd, ws, lambda q=q: q.weight), PlannedTensor(sn, sd, ss, lambda q=q: q.scale)]
        elif slot.storage is Storage.MXFP4:
            (wn, wd, ws), (sn, sd, ss) = entries
            nat = mxfp4_quantize(w, rule=MXFP4_RULE, name=slot.name).to_deepseek_native()
            planned += [PlannedTensor(wn, wd, ws, lambda t=nat["weight"]: t),
                        PlannedTensor(sn, sd, ss, lambda t=nat["scale"]: t)]
        else:
            (wn, wd, ws), = entries
            dt = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[wd]
            planned.append(PlannedTensor(wn, wd, ws, lambda t=w.to(dt).contiguous(): t))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    shards = assign_shards(planned, shard_size)
    weight_map: dict[str, str] = {}
    digits = 6 if arch.family.is_v3_like else 5
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):0{digits}d}.safetensors"
        write_streaming(out / fname, shard, {"format": "pt"})
        weight_map.update({t.name: fname for t in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in planned)}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out)                                   # tokenizer_config / generation_config
    (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return arch


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_nll(forward, held: torch.Tensor, ctx: int = CTX, max_tokens: int = 8192) -> tuple[float, int]:
    """Mean NLL (nats) over non-overlapping ``ctx`` windows of ``held`` (targets 1..ctx-1 of each window)."""
    n = min(len(held), max_tokens) // ctx
    tot, cnt = 0.0, 0
    for w in range(n):
        ids = held[w * ctx:(w + 1) * ctx][None]
        logits = forward(ids)
        lp = torch.log_softmax(logits[0, :-1].float(), -1)
        tot += float(-lp.gather(1, ids[0, 1:, None]).sum())
        cnt += ctx - 1
    return tot / cnt, cnt


def train(family: str, minutes: float, out: Path, threads: int, seed: int, batch: int,
          max_wall_minutes: float, init_from: Path | None = None, peak: float = 2e-3) -> dict:
    torch.set_num_threads(threads)
    random.seed(seed)
    model, spec = build_model(family, seed)
    arch = Arch.from_config(published_config(model, spec), "trained tiny config")
    targets = quant_targets(model, arch)      # matched on the random init (unique values), then reused
    previous = None
    if init_from is not None:                 # continue from a release of this script (same config)
        rep = Path(init_from) / "train_report.json"
        previous = json.loads(rep.read_text()) if rep.is_file() else None
        loaded = init_from_release(model, arch, Path(init_from))
        with torch.no_grad():
            src = dict(loaded.named_parameters())
            for n, p in model.named_parameters():
                p.copy_(src[n])
            bufs = dict(loaded.named_buffers())
            for n, b in model.named_buffers():
                if n.endswith(("tid2eid", "e_score_correction_bias")):
                    b.copy_(bufs[n])
        del loaded
    tr, held = load_tokens("train"), load_tokens("heldout")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{family}] params {n_params:,}; train tokens {len(tr):,}; held-out tokens {len(held):,}", flush=True)

    # aux-loss-free balancing: count routed experts in each top-k router's forward
    loads: dict[torch.nn.Module, torch.Tensor] = {}

    def hook(mod, inp, outp):
        if hasattr(mod, "e_score_correction_bias"):
            loads[mod] = loads.get(mod, 0) + torch.bincount(outp[2].reshape(-1), minlength=mod.num_experts)
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.register_forward_hook(hook)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95))
    warm = 30
    # Budget in CPU time of this process (the machine is shared: wall time says little), capped in wall time.
    budget, wall_budget = minutes * 60.0, max_wall_minutes * 60.0
    t0, c0 = time.monotonic(), time.process_time()
    step, qat_from, losses = 0, None, []
    g = torch.Generator().manual_seed(seed)
    model.train()
    while True:
        frac = max((time.process_time() - c0) / budget, (time.monotonic() - t0) / wall_budget)
        if frac >= 1.0:
            break
        lr = peak * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        qat = frac >= 1.0 - QAT_FRACTION
        if qat and qat_from is None:
            qat_from = step
            print(f"[{family}] step {step}: quantization-aware finishing from here", flush=True)
        starts = torch.randint(0, len(tr) - CTX - 1, (batch,), generator=g)
        ids = torch.stack([tr[s:s + CTX] for s in starts.tolist()])
        saved = []
        if qat:        # straight-through: forward/backward at the quantized point, update the float master
            with torch.no_grad():
                for t in targets:
                    view = t.param.data[t.index]
                    saved.append(view.clone())
                    view.copy_(roundtrip(view, t.storage, t.scale_dtype))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if qat:
            with torch.no_grad():
                for t, s in zip(targets, saved):
                    t.param.data[t.index].copy_(s)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for mod, cnt in loads.items():
                mod.e_score_correction_bias += BIAS_RATE * torch.sign(cnt.float().mean() - cnt.float())
        loads.clear()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(f"[{family}] step {step} wall {time.monotonic() - t0:.0f}s cpu {time.process_time() - c0:.0f}s loss {sum(losses[-25:]) / 25:.3f} "
                  f"lr {lr:.2e}", flush=True)
    train_s, train_cpu_s = time.monotonic() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():     # the float model with the published round trip applied = the released model
        nll_float, _ = heldout_nll(lambda x: model(input_ids=x, use_cache=False).logits, held)
        for t in targets:
            t.param.data[t.index].copy_(roundtrip(t.param.data[t.index], t.storage, t.scale_dtype))
        nll_q, cnt = heldout_nll(lambda x: model(input_ids=x, use_cache=False).logits, held)
    write_published(model, spec, out, CORPUS_DIR / "tokenizer.json")

    from v4convert.runtime import load
    rt = load(out, max_seq_len=CTX)
    nll_rt, _ = heldout_nll(lambda x: rt(x, 0), held)
    ids = held[:CTX][None]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    parity = float((rt(ids, 0) - ref).abs().max() / ref.abs().max())
    report = {
        "family": family, "params": n_params, "steps": step, "qat_from_step": qat_from, "batch": batch, "ctx": CTX,
        "train_wall_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu_s, 1), "threads": threads, "seed": seed, "train_tokens_seen": step * batch * CTX,
        "final_train_loss": sum(losses[-25:]) / max(1, len(losses[-25:])),
        "heldout_tokens_scored": cnt,
        "ppl_heldout_float": math.exp(nll_float), "ppl_heldout_published_hf": math.exp(nll_q),
        "ppl_heldout_runtime": math.exp(nll_rt), "ppl_unigram": unigram_ppl(tr, held[: cnt + cnt // (CTX - 1) + 1], VOCAB),
        "runtime_vs_transformers_rel_max_err": parity, "mxfp4_rule": MXFP4_RULE.value, "peak_lr": peak,
        "continued_from": previous,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return report


def evaluate_release(family: str, out: Path, threads: int, train_log: Path | None = None) -> dict:
    """Score a release (held-out perplexity by our runtime and by transformers on the release's values, their
    parity, the unigram baseline) and write ``train_report.json``; training facts are read from the log lines
    this script prints (``[fam] step N wall Ws cpu Cs loss L``) when the training process did not write them."""
    import re

    from v4convert.runtime import load

    torch.set_num_threads(threads)
    model, spec = build_model(family, 0)
    arch = Arch.from_config(published_config(model, spec), "trained tiny config")
    hf = init_from_release(model, arch, out).eval()
    tr, held = load_tokens("train"), load_tokens("heldout")
    nll_hf, cnt = heldout_nll(lambda x: hf(input_ids=x, use_cache=False).logits, held)
    rt = load(out, max_seq_len=CTX)
    nll_rt, _ = heldout_nll(lambda x: rt(x, 0), held)
    ids = held[:CTX][None]
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    report = {"family": family, "params": sum(p.numel() for p in hf.parameters()), "ctx": CTX,
              "heldout_tokens_scored": cnt, "ppl_heldout_float": None,
              "ppl_heldout_published_hf": math.exp(nll_hf), "ppl_heldout_runtime": math.exp(nll_rt),
              "ppl_unigram": unigram_ppl(tr, held[: cnt + cnt // (CTX - 1) + 1], VOCAB),
              "runtime_vs_transformers_rel_max_err": float((rt(ids, 0) - ref).abs().max() / ref.abs().max()),
              "mxfp4_rule": MXFP4_RULE.value}
    if train_log is not None:
        text = Path(train_log).read_text()
        steps = re.findall(r"step (\d+) wall (\d+)s cpu (\d+)s loss ([\d.]+)", text)
        qat = re.findall(r"step (\d+): quantization-aware finishing", text)
        n, wall, cpu, loss = steps[-1]
        report["training_log"] = {"last_logged_step": int(n), "wall_seconds": int(wall), "cpu_seconds": int(cpu),
                                  "train_loss_last_25": float(loss), "qat_from_step": int(qat[0]) if qat else None,
                                  "batch": 16, "note": "facts from the training log (logged every 25 steps); "
                                  "the run crashed after writing the release, before its own report"}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python tools/train_tiny.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("corpus", help="write data/corpus (manifest, held-out text, tokenizer)")
    t = sub.add_parser("train", help="train one family and write data/tiny-<family>")
    t.add_argument("--family", choices=sorted(SPECS), required=True)
    t.add_argument("--minutes", type=float, default=12.0, help="CPU-time budget of the training loop")
    t.add_argument("--max-wall-minutes", type=float, default=40.0, help="wall-clock cap of the training loop")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("--init-from", type=Path, default=None, help="continue from a release this script wrote")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    e = sub.add_parser("report", help="score an existing release and write its train_report.json")
    e.add_argument("--family", choices=sorted(SPECS), required=True)
    e.add_argument("--out", type=Path, default=None)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--train-log", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "corpus":
        m = build_corpus()
        n_held = sum(f["split"] == "heldout" for f in m["files"])
        print(f"corpus: {len(m['files'])} files ({n_held} held out), tokenizer vocab {m['tokenizer']['vocab_size']}")
    elif a.cmd == "report":
        evaluate_release(a.family, a.out or DATA / f"tiny-{a.family}", a.threads, a.train_log)
    else:
        train(a.family, a.minutes, a.out or DATA / f"tiny-{a.family}", a.threads, a.seed, a.batch, a.max_wall_minutes,
              a.init_from, a.lr)


if __name__ == "__main__":
    main()
