"""``v4convert verify``: how faithful and how fast an artifact is against its reference (DESIGN §7).

Both models run on the same token windows: ``W`` non-overlapping windows of ``L`` tokens of the data text
(REF's tokenizer, no BOS); position ``t`` of a window predicts token ``t + 1``, so each window scores
``L - 1`` tokens. Per scored token (natural logs; P = reference, Q = artifact):

* KL(P||Q) on the reference's top-``k`` tokens plus one bucket for the rest of the vocabulary:
  ``sum_top p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)``. With ``k >= V`` this is the exact
  KL; with ``k < V`` it is the KL of the distributions coarsened to those ``k + 1`` outcomes, never more
  than the exact one (data-processing inequality). This is what makes reference logits cacheable (llama.cpp
  ``--kl-divergence-base`` keeps all logits; top-k + rest keeps files small for a 129k vocabulary).
* top-1 agreement: the reference's argmax is also a maximum of Q.
* ``log P(correct)`` and ``log Q(correct)`` -> perplexities, their ratio and mean ln ratio; Δp = ``Q(correct) -
  P(correct)`` (llama.cpp's statistics: mean, RMS, percentiles).

Plus per-layer hidden-state relative error ``||h_Q - h_P|| / ||h_P||`` (Frobenius over the first
``hidden_tokens`` positions of window 0, where both runners expose hidden states), greedy generation
agreement over ``gen_tokens`` from ``gen_prompts`` prompts (each the first ``prompt_len`` tokens of a
window), and prefill / decode tokens per second of both.

Everything verify needs from the reference is a :class:`RefRecord`; ``--save-ref-logits`` stores it (one
safetensors file, written from per-window parts so a killed reference pass resumes), ``--ref-logits``
reuses it, and the report is the same as a fresh run's (except the artifact's own timings).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import ArtifactKind, Runner, check_runnable, open_runner
from v4convert.errors import UserError

from .report import COMPARE_COLUMNS, format_comparison, format_report  # noqa: F401 (re-exported)

FORMAT = "v4convert-ref-logits"
FORMAT_VERSION = 1
DEFAULT_DATA = Path(__file__).parents[1] / "data" / "corpus" / "heldout.txt"
DP_PERCENTILES = (0.1, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
KLD_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


class VerifyError(UserError):
    """Bad verify input: too little data, a reference cache that does not match, mismatched vocabularies."""


@dataclass(frozen=True)
class VerifyOptions:
    ctx: int = 512               # window length L (tokens)
    tokens: int = 4096           # tokens to score (rounded up to whole windows of L - 1 scored tokens)
    top_k: int = 256             # reference tokens kept per position (>= V: exact KL)
    gen_tokens: int = 32         # greedy continuation length per prompt
    gen_prompts: int = 4
    prompt_len: int = 32
    hidden_tokens: int = 64      # positions of window 0 compared layer by layer

    def settings(self, n_windows: int, vocab: int) -> dict:
        return {"ctx": self.ctx, "windows": n_windows, "scored_tokens": n_windows * (self.ctx - 1),
                "top_k": min(self.top_k, vocab), "kld_exact": self.top_k >= vocab, "gen_tokens": self.gen_tokens,
                "gen_prompts": self.gen_prompts, "prompt_len": self.prompt_len, "hidden_tokens": self.hidden_tokens}


@dataclass
class RefRecord:
    """What verify keeps of the reference. ``W`` windows, ``S = L - 1`` scored positions, ``k`` kept tokens."""
    windows: torch.Tensor        # int64 [W, L]
    topk_idx: torch.Tensor       # int64 [W, S, k], by decreasing probability
    topk_logp: torch.Tensor      # float32 [W, S, k]
    rest_logp: torch.Tensor      # float64 [W, S]: log of the mass outside the top-k (-inf if none)
    target_logp: torch.Tensor    # float32 [W, S]: log P(correct next token)
    hidden: list[torch.Tensor]   # per layer float32 [H, ...] of window 0 (empty if unavailable)
    greedy_prompts: torch.Tensor  # int64 [G, P]
    greedy_tokens: torch.Tensor   # int64 [G, N]
    prefill_tok_s: float
    decode_tok_s: float
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_windows(ref_path: Path, data: Path, opts: VerifyOptions) -> torch.Tensor:
    """``[W, L]`` token windows of ``data`` encoded with REF's ``tokenizer.json`` (no special tokens)."""
    from tokenizers import Tokenizer

    tj = Path(ref_path) / "tokenizer.json"
    if not tj.is_file():
        raise VerifyError(f"{tj}: the reference has no tokenizer.json (needed to encode {data})")
    if opts.ctx < 2:
        raise VerifyError(f"--ctx must be >= 2 (got {opts.ctx})")
    ids = Tokenizer.from_file(str(tj)).encode(Path(data).read_text(encoding="utf-8"), add_special_tokens=False).ids
    want = max(1, math.ceil(opts.tokens / (opts.ctx - 1)))
    have = len(ids) // opts.ctx
    if have == 0:
        raise VerifyError(f"{data}: {len(ids)} tokens, fewer than one window of --ctx {opts.ctx}")
    n = min(want, have)
    return torch.tensor(ids[: n * opts.ctx], dtype=torch.long).view(n, opts.ctx)


# ---------------------------------------------------------------------------------------------
# Per-token statistics (pure functions of the reference's top-k record and the artifact's log-probs)
# ---------------------------------------------------------------------------------------------
def reference_view(logp: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """From reference log-probs ``[S, V]``: (top-k idx, top-k logp, rest logp (float64), target logp)."""
    k = min(k, logp.shape[-1])
    vals, idx = torch.topk(logp, k, dim=-1)
    rest = torch.logsumexp(logp.double().scatter(-1, idx, float("-inf")), dim=-1)
    return idx, vals, rest, logp.gather(-1, targets[:, None])[:, 0]


def token_stats(topk_idx: torch.Tensor, topk_logp: torch.Tensor, rest_logp: torch.Tensor,
                target_logp: torch.Tensor, art_logp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per scored token: ``kld`` (float64), ``top1`` (bool), ``nll_ref``, ``nll_art``, ``dp`` (float64).

    ``art_logp`` ``[S, V]`` are the artifact's log-probs, ``targets`` ``[S]`` the correct next tokens.
    """
    lq = art_logp.double()
    lp_top = topk_logp.double()
    kl_top = (lp_top.exp() * (lp_top - lq.gather(-1, topk_idx))).sum(-1)
    lq_rest = torch.logsumexp(lq.scatter(-1, topk_idx, float("-inf")), dim=-1)
    p_rest = rest_logp.exp()
    kl_rest = torch.where(p_rest > 0, p_rest * (rest_logp - lq_rest), torch.zeros_like(p_rest))
    art_target = lq.gather(-1, targets[:, None])[:, 0]
    top1 = lq.gather(-1, topk_idx[:, :1])[:, 0] >= lq.max(-1).values
    return {"kld": kl_top + kl_rest, "top1": top1, "nll_ref": -target_logp.double(), "nll_art": -art_target,
            "dp": art_target.exp() - target_logp.double().exp()}


def _pct(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q / 100.0)) if x.numel() else float("nan")


def summarize(tok: dict[str, torch.Tensor]) -> dict:
    """Aggregate per-token statistics (quantiles interpolate linearly, as numpy's default)."""
    kld, dp = tok["kld"], tok["dp"]
    ppl_ref, ppl_art = math.exp(float(tok["nll_ref"].mean())), math.exp(float(tok["nll_art"].mean()))
    return {
        "kld": {"mean": float(kld.mean()), "median": _pct(kld, 50.0), "max": float(kld.max()),
                **{f"p{q:g}".replace(".", "_"): _pct(kld, q) for q in KLD_PERCENTILES if q != 50.0}},
        "top1_agreement": float(tok["top1"].double().mean()),
        "ppl": {"ref": ppl_ref, "art": ppl_art, "ratio": ppl_art / ppl_ref,
                "mean_ln_ratio": float((tok["nll_art"] - tok["nll_ref"]).mean())},
        "delta_p": {"mean": float(dp.mean()), "rms": math.sqrt(float((dp * dp).mean())), "min": float(dp.min()),
                    "max": float(dp.max()),
                    "percentiles": {f"p{q:g}": _pct(dp, q) for q in DP_PERCENTILES}},
    }


def kld_histogram(kld: torch.Tensor, bins: int = 24) -> dict:
    """Counts of per-token KLD in log-spaced bins from 1e-6 (everything below goes to the first bin)."""
    hi = max(float(kld.max()), 1e-5) * 1.0001
    edges = torch.logspace(-6, math.log10(hi), bins + 1, dtype=torch.float64)
    idx = torch.bucketize(kld.clamp(min=1e-6), edges[1:-1])
    return {"edges": edges.tolist(), "counts": torch.bincount(idx, minlength=bins).tolist()}


# ---------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------
def greedy(runner: Runner, prompt: torch.Tensor, n: int) -> tuple[list[int], float, int]:
    """Greedy continuation of ``prompt`` [P]: (tokens, decode seconds, decode steps)."""
    logits = runner.forward(prompt[None], 0)
    nxt = int(logits[-1].argmax())
    out, t_dec = [nxt], 0.0
    for i in range(n - 1):
        t = time.perf_counter()
        logits = runner.forward(torch.tensor([[nxt]]), prompt.numel() + i)
        t_dec += time.perf_counter() - t
        nxt = int(logits[-1].argmax())
        out.append(nxt)
    return out, t_dec, n - 1


def _greedy_prompts(windows: torch.Tensor, opts: VerifyOptions) -> torch.Tensor:
    g = min(opts.gen_prompts, windows.shape[0])
    return windows[:g, : min(opts.prompt_len, windows.shape[1])].clone()


def _token_rows(gen: list[list[int]]) -> torch.Tensor:
    """Generated tokens as LongTensor ``[prompts, tokens]`` (``[0, 0]`` with ``--gen-prompts 0``)."""
    return torch.tensor(gen, dtype=torch.long).reshape(len(gen), len(gen[0]) if gen else 0)


def _hidden_slice(runner: Runner, opts: VerifyOptions) -> list[torch.Tensor]:
    hs = runner.hidden_states()
    return [h[: opts.hidden_tokens].contiguous() for h in hs] if hs else []


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def reference_pass(runner: Runner, windows: torch.Tensor, opts: VerifyOptions, meta: dict,
                   save: Path | None = None, progress=None) -> RefRecord:
    """Run the reference over ``windows``; with ``save``, each window is stored as it completes in
    ``SAVE.parts/`` (a rerun with the same settings skips finished windows) and merged into ``save`` at the end."""
    from safetensors.torch import load_file, save_file

    parts = _parts_dir(save) if save else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
        mfile = parts / "meta.json"
        if mfile.exists() and json.loads(mfile.read_text()) != meta:
            raise VerifyError(f"{parts}: unfinished reference pass with other settings; remove it or use them")
        mfile.write_text(json.dumps(meta))
    rows: list[dict[str, torch.Tensor]] = []
    hidden: list[torch.Tensor] = []
    t_pre, n_pre = 0.0, 0
    for w in range(windows.shape[0]):
        f = parts / f"window-{w:06d}.safetensors" if parts is not None else None
        if f is not None and f.exists():
            row = load_file(str(f))
        else:
            runner_capture(runner, w == 0)
            t = time.perf_counter()
            logits = runner.forward(windows[w][None], 0)
            dt = time.perf_counter() - t
            if logits.shape[-1] != meta["vocab"]:
                raise VerifyError(f"reference returned {logits.shape[-1]} logits per token, config says {meta['vocab']}")
            idx, vals, rest, tgt = reference_view(torch.log_softmax(logits[:-1].float(), -1), windows[w, 1:], opts.top_k)
            row = {"topk_idx": idx, "topk_logp": vals, "rest_logp": rest, "target_logp": tgt,
                   "seconds": torch.tensor([dt], dtype=torch.float64)}
            if w == 0:
                for i, h in enumerate(_hidden_slice(runner, opts)):
                    row[f"hidden.{i}"] = h
            if f is not None:
                save_file(row, str(f))
        if w == 0:
            hidden = [row[f"hidden.{i}"] for i in range(sum(k.startswith("hidden.") for k in row))]
        t_pre += float(row["seconds"][0])
        n_pre += windows.shape[1]
        rows.append(row)
        if progress:
            progress(w + 1, windows.shape[0])
    runner_capture(runner, False)
    prompts = _greedy_prompts(windows, opts)
    gen, t_dec, n_dec = [], 0.0, 0
    for p in prompts:
        toks, dt, n = greedy(runner, p, opts.gen_tokens)
        gen.append(toks)
        t_dec, n_dec = t_dec + dt, n_dec + n
    rec = RefRecord(windows=windows, topk_idx=torch.stack([r["topk_idx"] for r in rows]),
                    topk_logp=torch.stack([r["topk_logp"] for r in rows]),
                    rest_logp=torch.stack([r["rest_logp"] for r in rows]),
                    target_logp=torch.stack([r["target_logp"] for r in rows]), hidden=hidden,
                    greedy_prompts=prompts, greedy_tokens=_token_rows(gen),
                    prefill_tok_s=n_pre / t_pre if t_pre > 0 else float("nan"),
                    decode_tok_s=n_dec / t_dec if t_dec > 0 else float("nan"), meta=meta)
    if save is not None:
        save_record(rec, save)
        for f in sorted(parts.iterdir()):
            f.unlink()
        parts.rmdir()
    return rec


def runner_capture(runner: Runner, on: bool) -> None:
    """Ask a runner that supports it to record hidden states on the next forwards."""
    if hasattr(runner, "capture"):
        runner.capture = on


def save_record(rec: RefRecord, path: Path) -> None:
    from safetensors.torch import save_file

    t = {"windows": rec.windows, "topk_idx": rec.topk_idx.to(torch.int32), "topk_logp": rec.topk_logp,
         "rest_logp": rec.rest_logp, "target_logp": rec.target_logp, "greedy_prompts": rec.greedy_prompts,
         "greedy_tokens": rec.greedy_tokens}
    t.update({f"hidden.{i}": h for i, h in enumerate(rec.hidden)})
    meta = dict(rec.meta, prefill_tok_s=rec.prefill_tok_s, decode_tok_s=rec.decode_tok_s, n_hidden=len(rec.hidden))
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp),
              metadata={"format": FORMAT, "version": str(FORMAT_VERSION), "meta": json.dumps(meta)})
    tmp.replace(path)


def load_record(path: Path) -> RefRecord:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise VerifyError(f"{path}: not a v4convert reference-logits file (format {md.get('format')!r})")
            if md.get("version") != str(FORMAT_VERSION):
                raise VerifyError(f"{path}: reference-logits version {md.get('version')}, this tool reads {FORMAT_VERSION}")
            meta = json.loads(md["meta"])
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise VerifyError(f"{path}: cannot read reference logits ({e})") from None
    except Exception as e:          # safetensors raises its own error type on corrupt headers
        if isinstance(e, VerifyError):
            raise
        raise VerifyError(f"{path}: cannot read reference logits ({e})") from None
    return RefRecord(windows=t["windows"], topk_idx=t["topk_idx"].long(), topk_logp=t["topk_logp"],
                     rest_logp=t["rest_logp"], target_logp=t["target_logp"],
                     hidden=[t[f"hidden.{i}"] for i in range(int(meta.get("n_hidden", 0)))],
                     greedy_prompts=t["greedy_prompts"], greedy_tokens=t["greedy_tokens"],
                     prefill_tok_s=float(meta["prefill_tok_s"]), decode_tok_s=float(meta["decode_tok_s"]), meta=meta)


def artifact_pass(runner: Runner, ref: RefRecord, opts: VerifyOptions, progress=None) -> dict:
    """Run the artifact on the reference's windows and prompts; returns the report's comparison part."""
    stats: list[dict[str, torch.Tensor]] = []
    t_pre, n_pre = 0.0, 0
    hidden: list[torch.Tensor] = []
    W = ref.windows.shape[0]
    if runner.vocab_size != ref.meta["vocab"]:     # before any forward: a smaller vocab would index past its embedding
        raise VerifyError(f"{runner.path}: the artifact's vocabulary has {runner.vocab_size} tokens, the reference's "
                          f"{ref.meta['vocab']}; verify compares models with the same tokenizer")
    for w in range(W):
        runner_capture(runner, w == 0)
        t = time.perf_counter()
        logits = runner.forward(ref.windows[w][None], 0)
        t_pre += time.perf_counter() - t
        n_pre += ref.windows.shape[1]
        if logits.shape[-1] != ref.meta["vocab"]:
            raise VerifyError(f"artifact returns {logits.shape[-1]} logits per token, the reference {ref.meta['vocab']}")
        if w == 0:
            hidden = _hidden_slice(runner, opts)
        lq = torch.log_softmax(logits[:-1].float(), -1)
        stats.append(token_stats(ref.topk_idx[w], ref.topk_logp[w], ref.rest_logp[w], ref.target_logp[w], lq,
                                 ref.windows[w, 1:]))
        if progress:
            progress(w + 1, W)
    runner_capture(runner, False)
    tok = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
    report = summarize(tok)
    report["kld_histogram"] = kld_histogram(tok["kld"])
    report["hidden"] = hidden_report(ref.hidden, hidden)
    gen, t_dec, n_dec = [], 0.0, 0
    for p in ref.greedy_prompts:
        toks, dt, n = greedy(runner, p, ref.greedy_tokens.shape[1])
        gen.append(toks)
        t_dec, n_dec = t_dec + dt, n_dec + n
    report["greedy"] = greedy_agreement(ref.greedy_tokens, _token_rows(gen))
    report["_per_token_kld"] = tok["kld"]
    report["_speed"] = {"prefill_tok_s": n_pre / t_pre if t_pre > 0 else float("nan"),
                        "decode_tok_s": n_dec / t_dec if t_dec > 0 else float("nan")}
    return report


def hidden_report(ref: list[torch.Tensor], art: list[torch.Tensor]) -> dict:
    """Per-layer ``||a - r|| / ||r||`` when both sides exposed matching hidden states."""
    if not ref or not art:
        who = "reference" if not ref else "artifact"
        return {"available": False, "reason": f"the {who} runner does not expose hidden states", "rel_err": []}
    if len(ref) != len(art) or any(r.shape != a.shape for r, a in zip(ref, art)):
        return {"available": False, "reason": "hidden states differ in layer count or shape", "rel_err": []}
    errs = [float((a.double() - r.double()).norm() / r.double().norm().clamp(min=1e-30)) for r, a in zip(ref, art)]
    return {"available": True, "tokens": int(ref[0].shape[0]), "rel_err": errs}


def greedy_agreement(ref: torch.Tensor, art: torch.Tensor) -> dict:
    """``prefix``: mean fraction of tokens generated identically before the first difference;
    ``position``: fraction of positions with the same token."""
    n = ref.shape[1]
    same = ref == art
    prefix = [int(s.long().cumprod(0).sum()) for s in same]
    return {"prompts": int(ref.shape[0]), "tokens": int(n),
            "prefix_agreement": sum(prefix) / (len(prefix) * n) if prefix else float("nan"),
            "position_agreement": float(same.double().mean()) if same.numel() else float("nan")}


# ---------------------------------------------------------------------------------------------
# The whole verify
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    max_kld: float | None = None          # on mean KLD
    min_top1: float | None = None
    max_ppl_ratio: float | None = None

    def failures(self, r: dict) -> list[str]:
        out = []
        if self.max_kld is not None and not r["kld"]["mean"] <= self.max_kld:
            out.append(f"mean KLD {r['kld']['mean']:.6g} > --max-kld {self.max_kld:g}")
        if self.min_top1 is not None and not r["top1_agreement"] >= self.min_top1:
            out.append(f"top-1 agreement {r['top1_agreement']:.4f} < --min-top1 {self.min_top1:g}")
        if self.max_ppl_ratio is not None and not r["ppl"]["ratio"] <= self.max_ppl_ratio:
            out.append(f"perplexity ratio {r['ppl']['ratio']:.4f} > --max-ppl-ratio {self.max_ppl_ratio:g}")
        return out


def _config_sha(path: Path) -> str:
    cfg = Path(path) / "config.json"
    return sha256_file(cfg) if cfg.is_file() else ""


def verify(ref_path: Path, art_path: Path, opts: VerifyOptions | None = None, data: Path | None = None,
           thresholds: Thresholds = Thresholds(), save_ref: Path | None = None, ref_cache: Path | None = None,
           art_kind: ArtifactKind | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
           progress=None, dynamic_routing=None, act_quant: bool = True) -> dict:
    """Compare ``art_path`` with ``ref_path``; returns the full report (see module doc). ``ref_cache``: use a
    saved :class:`RefRecord` instead of running the reference (its windows and settings are used; ``data``
    and ``opts`` must agree with it when given). ``dynamic_routing`` (``runtime.DynamicRouting``): the
    artifact runs with it (our runtime), and the report gains ``routing``: mean routed experts per token
    over every MoE layer call of the artifact's passes vs the model's static top-k. ``act_quant=False``: the
    artifact runs weights-only even where its config declares 4-bit input activations (our runtime; the
    report's ``settings.act_quant`` says so)."""
    ref_path, art_path = Path(ref_path), Path(art_path)
    art_kind = check_runnable(art_path, art_kind)         # fail before the reference pass
    if ref_cache is not None:
        rec = load_record(Path(ref_cache))
        check_cache(rec, ref_path, opts, data)
        opts = VerifyOptions(**rec.meta["options"])
    else:
        opts = opts or VerifyOptions(ctx=default_ctx(ref_path))
        check_ctx(ref_path, opts.ctx)
        data = Path(data) if data is not None else DEFAULT_DATA
        windows = make_windows(ref_path, data, opts)
        from ..paths import read_checkpoint_json
        cfg = read_checkpoint_json(ref_path, "config.json")
        meta = {"ref": str(ref_path), "ref_config_sha256": _config_sha(ref_path), "data": str(data),
                "data_sha256": sha256_file(data), "vocab": int(cfg["vocab_size"]), "options": opts.__dict__.copy()}
    max_seq = max(opts.ctx, opts.prompt_len + opts.gen_tokens)
    if ref_cache is None:
        runner = open_runner(ref_path, ArtifactKind.RUNTIME, device=device, dtype=torch.float32, max_seq_len=max_seq)
        try:
            rec = reference_pass(runner, windows, opts, meta, save=save_ref,
                                 progress=(lambda i, n: progress("reference", i, n)) if progress else None)
        finally:
            runner.close()
            del runner
    art = open_runner(art_path, art_kind, device=device, dtype=dtype, max_seq_len=max_seq,
                      dynamic_routing=dynamic_routing, act_quant=act_quant)
    notes = list(getattr(art, "notes", []))      # e.g. the vLLM runner: version, CPU kernel shims
    if not act_quant:
        notes.append("activation quantization declared by the config ignored (--no-act-quant): weights-only")
    routing = None
    try:
        comp = artifact_pass(art, rec, opts, progress=(lambda i, n: progress("artifact", i, n)) if progress else None)
        if dynamic_routing is not None:
            st = art.model.routing_stats()
            static = int(json.loads((art_path / "config.json").read_text())["num_experts_per_tok"])
            routing = {"top_p": dynamic_routing.top_p, "k_min": dynamic_routing.k_min,
                       "k_max": dynamic_routing.k_max, "experts_per_token": st["experts_per_token"],
                       "static_top_k": static, "compute_saved": 1 - st["experts_per_token"] / static,
                       "token_layer_calls": st["token_layer_calls"]}
    finally:
        art.close()
    speed, per_token = comp.pop("_speed"), comp.pop("_per_token_kld")
    report = {
        "reference": {"path": str(ref_path), "kind": ArtifactKind.RUNTIME.value, "from_cache": ref_cache is not None,
                      "ppl": comp["ppl"]["ref"], "prefill_tok_s": rec.prefill_tok_s, "decode_tok_s": rec.decode_tok_s},
        "artifact": {"path": str(art_path), "kind": art_kind.value, "ppl": comp["ppl"]["art"],
                     "dtype": str(dtype).replace("torch.", ""), "device": device, "act_quant": act_quant, **speed,
                     "notes": notes},
        "data": {"path": rec.meta["data"], "sha256": rec.meta["data_sha256"]},
        "settings": opts.settings(rec.windows.shape[0], rec.meta["vocab"]),
        "routing": routing,
        **comp,
    }
    fails = thresholds.failures(report)
    report["thresholds"] = {"max_kld": thresholds.max_kld, "min_top1": thresholds.min_top1,
                            "max_ppl_ratio": thresholds.max_ppl_ratio, "failures": fails, "passed": not fails}
    report["_per_token_kld"] = per_token      # for the plot; dropped from JSON
    return report


def context_limit(ckpt: Path) -> int | None:
    """The model's context limit (``max_position_embeddings`` of ``config.json``), None if not stated."""
    p = Path(ckpt) / "config.json"
    try:
        n = json.loads(p.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(n) if isinstance(n, int) and n > 0 else None


def default_ctx(ref: Path) -> int:
    """Window length when ``--ctx`` is not given, shared by ``verify`` and ``demo``: the training context of
    our trained fixtures (``train_report.json``: 128 for the bundled tiny models, the length their
    perplexity means something at), else ``VerifyOptions.ctx`` (512), capped by the model's limit."""
    n = VerifyOptions.ctx
    rep = Path(ref) / "train_report.json"
    if rep.is_file():
        n = int(json.loads(rep.read_text()).get("ctx") or n)
    lim = context_limit(ref)
    return min(n, lim) if lim else n


def check_ctx(ref: Path, ctx: int, what: str = "--ctx") -> None:
    """Refuse a window longer than the model's context limit (positions past it are out of distribution
    and, with YaRN, beyond the scaled rope)."""
    lim = context_limit(ref)
    if ctx < 2:
        raise VerifyError(f"{what} {ctx}: a window needs at least 2 tokens")
    if lim is not None and ctx > lim:
        raise VerifyError(f"{what} {ctx} exceeds the model's context limit of {lim} tokens "
                          f"(max_position_embeddings in {Path(ref) / 'config.json'})")


def cached_options(path: Path) -> VerifyOptions:
    """The options a reference-logits file was made with."""
    return VerifyOptions(**load_record(Path(path)).meta["options"])


def check_cache(rec: RefRecord, ref_path: Path, opts: VerifyOptions | None, data: Path | None) -> None:
    m = rec.meta
    sha = _config_sha(ref_path)
    if sha and m.get("ref_config_sha256") and sha != m["ref_config_sha256"]:
        raise VerifyError(f"reference logits were made from another model ({m['ref']}); {ref_path}/config.json differs")
    if data is not None and sha256_file(Path(data)) != m["data_sha256"]:
        raise VerifyError(f"--data {data} is not the text the reference logits were made from ({m['data']})")
    if opts is not None:
        for k, v in m["options"].items():
            if getattr(opts, k) != v:
                raise VerifyError(f"--{k.replace('_', '-')} {getattr(opts, k)} differs from the reference logits' {v}")


def json_report(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}
