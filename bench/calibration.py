"""Calibrated vs data-free FP4 on the bundled trained tiny models, same held-out windows for every row.

    python bench/calibration.py --out /tmp/calib-bench [--tokens 4096 --ctx 128 --calib-tokens 8192
                                                        --calib-seq-len 256 --models v3,v4 --threads 1]

For each model (tiny-v3, tiny-v4) and variant runs ``v4convert quantize`` (default recipes: nvfp4-experts /
mxfp4-experts; calibration on the bundled *training* split) and ``verify`` against the release on the held-out
text (one cached reference pass per model). Prints, per model, verify's KLD mean / p99, top-1, PPL ratio, the
measured bits per FP4 weight (all stored parts of the FP4 linears over their element count) and each row's
mean KLD as a ratio to its scheme's RTN row; writes OUT/calibration.json. Targets (issue 12): best calibrated
NVFP4 mean KLD <= 0.7x RTN, best calibrated MXFP4 <= 0.6x RTN.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from v4convert.formats.safetensors_io import read_header

from v4convert.cli.quantize import quantize_command
from v4convert.demo import bundled_model
from v4convert.verify import VerifyOptions, json_report, verify

# (scheme, label, quantize args); the first row of each scheme is its RTN baseline. "w4a4" rows also quantize
# activations (static calibrated NVFP4 input scales / dynamic MXFP4); verify runs them with that act-quant.
VARIANTS = (
    ("nvfp4", "rtn", ("--scheme", "nvfp4", "--method", "rtn")),
    ("nvfp4", "mse", ("--scheme", "nvfp4", "--method", "mse")),
    ("nvfp4", "four-over-six", ("--scheme", "nvfp4", "--method", "four-over-six")),
    ("nvfp4", "awq", ("--scheme", "nvfp4", "--method", "awq")),
    ("nvfp4", "gptq", ("--scheme", "nvfp4", "--method", "gptq")),
    ("nvfp4", "gptq scales-during", ("--scheme", "nvfp4", "--method", "gptq", "--gptq-scales", "during")),
    ("nvfp4", "gptq act-order", ("--scheme", "nvfp4", "--method", "gptq", "--gptq-act-order")),
    ("nvfp4", "awq+gptq", ("--scheme", "nvfp4", "--method", "awq+gptq")),
    ("nvfp4", "gptq+four-over-six", ("--scheme", "nvfp4", "--method", "gptq+four-over-six")),
    ("nvfp4", "gptq propagate=original", ("--scheme", "nvfp4", "--method", "gptq", "--propagate", "original")),
    # --gptq-damp 1.0: the default 0.01 over-fits 4096 calibration tokens (per-linear held-out error, KLD tail)
    ("nvfp4", "gptq damp=1", ("--scheme", "nvfp4", "--method", "gptq", "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+four-over-six damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six", "--gptq-damp", "1.0")),
    ("nvfp4", "awq+gptq+4/6 damp=1", ("--scheme", "nvfp4", "--method", "awq+gptq+four-over-six", "--gptq-damp", "1.0")),
    ("nvfp4", "awq+gptq+4/6 act-order damp=1", ("--scheme", "nvfp4", "--method", "awq+gptq+four-over-six",
                                                "--gptq-act-order", "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 scales-search damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six",
                                                "--gptq-scales", "search", "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 scales-search damp=3", ("--scheme", "nvfp4", "--method", "gptq+four-over-six",
                                                "--gptq-scales", "search", "--gptq-damp", "3.0")),
    ("nvfp4", "gptq scales-search damp=1", ("--scheme", "nvfp4", "--method", "gptq", "--gptq-scales", "search",
                                            "--gptq-damp", "1.0")),
    # --gptq-refine 3: coordinate-descent sweeps on GPTQ's objective after GPTQ (same scales)
    ("nvfp4", "gptq+4/6 refine=3 damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six", "--gptq-refine", "3",
                                           "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 scales-search refine=3 damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six",
                                                         "--gptq-scales", "search", "--gptq-refine", "3",
                                                         "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 scales-search refine=3 damp=3", ("--scheme", "nvfp4", "--method", "gptq+four-over-six",
                                                         "--gptq-scales", "search", "--gptq-refine", "3",
                                                         "--gptq-damp", "3.0")),
    ("nvfp4", "gptq+4/6 target=original damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six",
                                                  "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 scales-search refine=3 target=original damp=1", ("--scheme", "nvfp4", "--method",
                                                                         "gptq+four-over-six", "--gptq-scales", "search",
                                                                         "--gptq-refine", "3", "--gptq-target",
                                                                         "original", "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 true-seq target=original damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("nvfp4", "gptq+4/6 scales-search refine=3 true-seq target=original damp=1", ("--scheme", "nvfp4", "--method", "gptq+four-over-six", "--gptq-scales", "search", "--gptq-refine", "3", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("nvfp4", "awq+gptq+4/6 true-seq target=original damp=1", ("--scheme", "nvfp4", "--method", "awq+gptq+four-over-six", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("nvfp4", "rtn w4a4", ("--scheme", "nvfp4", "--method", "rtn", "--activations", "w4a4")),
    ("nvfp4", "gptq w4a4", ("--scheme", "nvfp4", "--method", "gptq", "--activations", "w4a4")),
    ("mxfp4", "rtn", ("--scheme", "mxfp4", "--method", "rtn")),
    ("mxfp4", "awq", ("--scheme", "mxfp4", "--method", "awq")),
    ("mxfp4", "gptq", ("--scheme", "mxfp4", "--method", "gptq")),
    ("mxfp4", "gptq act-order", ("--scheme", "mxfp4", "--method", "gptq", "--gptq-act-order")),
    ("mxfp4", "awq+gptq", ("--scheme", "mxfp4", "--method", "awq+gptq")),
    ("mxfp4", "gptq damp=1", ("--scheme", "mxfp4", "--method", "gptq", "--gptq-damp", "1.0")),
    ("mxfp4", "gptq act-order damp=1", ("--scheme", "mxfp4", "--method", "gptq", "--gptq-act-order", "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-damp", "1.0")),
    # MXFP4 exponent search (mse: per block e-1 / e / e+1 by weight MSE; scales-search: per row and block during
    # GPTQ, the candidate with the least GPTQ loss) and act-order, all at damp 1
    ("mxfp4", "mse", ("--scheme", "mxfp4", "--method", "mse")),
    ("mxfp4", "awq+gptq+mse damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq+mse", "--gptq-damp", "1.0")),
    ("mxfp4", "gptq scales-search damp=1", ("--scheme", "mxfp4", "--method", "gptq", "--gptq-scales", "search",
                                            "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq act-order damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-act-order",
                                            "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq+mse damp=3", ("--scheme", "mxfp4", "--method", "awq+gptq+mse", "--gptq-damp", "3.0")),
    ("mxfp4", "gptq scales-search damp=3", ("--scheme", "mxfp4", "--method", "gptq", "--gptq-scales", "search",
                                            "--gptq-damp", "3.0")),
    ("mxfp4", "awq+gptq refine=3 damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-refine", "3",
                                           "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq refine=3 damp=3", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-refine", "3",
                                           "--gptq-damp", "3.0")),
    ("mxfp4", "awq+gptq act-order refine=3 damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-act-order",
                                                     "--gptq-refine", "3", "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq act-order refine=3 damp=3", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-act-order",
                                                     "--gptq-refine", "3", "--gptq-damp", "3.0")),
    ("mxfp4", "gptq+mse scales-search refine=3 damp=1", ("--scheme", "mxfp4", "--method", "gptq+mse", "--gptq-scales",
                                                         "search", "--gptq-refine", "3", "--gptq-damp", "1.0")),
    # --gptq-target original: GPTQ aims at the original model's outputs from the quantized model's inputs (GPTAQ-style)
    ("mxfp4", "awq+gptq target=original damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-target",
                                                  "original", "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq act-order refine=3 target=original damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq",
                                                                     "--gptq-act-order", "--gptq-refine", "3",
                                                                     "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("mxfp4", "gptq+mse scales-search refine=3 target=original damp=1", ("--scheme", "mxfp4", "--method", "gptq+mse",
                                                                         "--gptq-scales", "search", "--gptq-refine", "3",
                                                                         "--gptq-target", "original", "--gptq-damp",
                                                                         "1.0")),
    ("mxfp4", "awq+gptq target=original damp=0.3", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-target",
                                                    "original", "--gptq-damp", "0.3")),
    ("mxfp4", "awq+gptq target=original damp=3", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-target",
                                                  "original", "--gptq-damp", "3.0")),
    # --true-sequential: staged statistics inside a block (attention, output projections, gate/up, down)
    ("mxfp4", "awq+gptq true-seq damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--true-sequential",
                                           "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq true-seq target=original damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq",
                                                           "--true-sequential", "--gptq-target", "original",
                                                           "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq act-order refine=3 true-seq target=original damp=1", (
        "--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-act-order", "--gptq-refine", "3", "--true-sequential",
        "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("mxfp4", "awq+gptq true-seq target=original damp=0.3", ("--scheme", "mxfp4", "--method", "awq+gptq", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "0.3")),
    ("mxfp4", "awq+gptq true-seq target=original damp=3", ("--scheme", "mxfp4", "--method", "awq+gptq", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "3.0")),
    ("mxfp4", "awq+gptq refine=3 true-seq target=original damp=1", ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-refine", "3", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("mxfp4", "gptq+mse scales-search refine=3 true-seq target=original damp=1", ("--scheme", "mxfp4", "--method", "gptq+mse", "--gptq-scales", "search", "--gptq-refine", "3", "--true-sequential",
              "--gptq-target", "original", "--gptq-damp", "1.0")),
    ("mxfp4", "rtn w4a4", ("--scheme", "mxfp4", "--method", "rtn", "--activations", "w4a4")),
    ("mxfp4", "gptq w4a4", ("--scheme", "mxfp4", "--method", "gptq", "--activations", "w4a4")),
)
FP4_WEIGHT = ("weight_packed", "weight")     # compressed-tensors packed FP4 entry names (U8)


def quantize_cli(src: Path, out: Path, args: tuple[str, ...]) -> None:
    """``v4convert quantize SRC --fp4 --out OUT --workers 1 ARGS`` through its click command."""
    argv = [str(src), "--fp4", "--out", str(out), "--workers", "1", "--overwrite", *args]
    quantize_command.main(argv, standalone_mode=False)


def fp4_bits_per_weight(art: Path) -> float:
    """Stored bits per element over the FP4 linears (codes + block scales + global scales)."""
    entries = {}
    for shard in sorted(art.glob("*.safetensors")):
        entries.update(read_header(shard)[0])
    bits = n = 0
    for name, e in entries.items():
        if name.endswith(".weight_packed"):
            stem = name[: -len("weight_packed")]
            n += e.shape[0] * e.shape[1] * 2
            bits += 8 * sum(x.nbytes for k, x in entries.items() if k.startswith(stem) and k[len(stem):] in
                            ("weight_packed", "weight_scale", "weight_global_scale"))
    return bits / n if n else float("nan")


def layer_error(fam: str, out: Path, methods: list[str], calib_tokens: int, calib_seq_len: int,
                tokens: int, ctx: int, codecs: tuple[str, ...] = ("nvfp4", "mxfp4")) -> None:
    """Per-linear output-error diagnostic: for each FP4 linear of the RTN NVFP4 artifact (its names), the
    relative error ``tr(D H D^T) / tr(W H W^T)``, ``D = W - Q`` (= ||XW^T - XQ^T||^2 / ||XW^T||^2), with ``H``
    from the calibration windows and from the held-out windows (original model's inputs, no propagation).
    ``methods``: ``SPEC[:DAMP[:FLAGS]]`` (e.g. ``gptq:1.0``, ``awq+gptq:1.0:act``; FLAGS ``/``-joined of act,
    during, search = ``--gptq-act-order`` / ``--gptq-scales during|search``), quantized with the calibration ``H``. Prints the sums over
    linears (calibration / held-out) per role."""
    from v4convert.calib.collect import collect_stats
    from v4convert.calib.data import CORPUS_DIR, calibration_windows
    from v4convert.calib.method import GPTQSettings, MethodSpec, quantize_weight
    from v4convert.checkpoint import Checkpoint
    from v4convert.formats.fp4_grid import FP4Codec

    ref = bundled_model(fam)
    art = out / f"tiny-{fam}" / "nvfp4-rtn"
    if not art.is_dir():
        quantize_cli(ref, art, ("--scheme", "nvfp4", "--method", "rtn"))
    names = [k[: -len("_packed")] for f in sorted(art.glob("*.safetensors")) for k in read_header(f)[0]
             if k.endswith(".weight_packed")]
    cal = collect_stats(ref, calibration_windows(ref, None, calib_tokens, calib_seq_len), names, propagate=False).stats
    held = collect_stats(ref, calibration_windows(ref, CORPUS_DIR / "heldout.txt", tokens, ctx), names,
                         propagate=False).stats
    sums: dict[tuple[str, str], list[float]] = {}
    with Checkpoint.open(ref) as ck:
        for n in names:
            if n not in cal or n not in held:
                continue
            w = ck.dequantize(n).float()
            role = ("expert " if ".experts." in n else "") + n.split(".")[-2]
            hs = (cal[n].hessian().double(), held[n].hessian().double())
            den = [float((w.double() @ h * w.double()).sum()) for h in hs]
            for codec in (FP4Codec.NVFP4, FP4Codec.MXFP4):
                if codec.value not in codecs:
                    continue
                for m in methods:
                    spec, _, rest = m.partition(":")
                    damp, _, flags = rest.partition(":")
                    gs = GPTQSettings(damp=float(damp or 0.01), act_order="act" in flags.split("/"),
                                      scales_during="during" in flags.split("/"),
                                      scales_search="search" in flags.split("/"),
                                      refine=sum(int(f[2:]) for f in flags.split("/") if f.startswith("cd")))
                    q = quantize_weight(MethodSpec.parse(spec), codec, w, cal[n].hessian(), global_amax=w.abs().amax(),
                                        gptq=gs, name=n).dequantize().double()
                    d = w.double() - q
                    acc = sums.setdefault((f"{codec.value} {m}", role), [0.0, 0.0])
                    for i, h in enumerate(hs):
                        acc[i] += float((d @ h * d).sum()) / den[i]
    roles = sorted({r for _, r in sums})
    print(f"\ntiny-{fam}: sum over linears of ||XW^T-XQ^T||^2/||XW^T||^2, calibration / held-out H")
    print(f"  {'scheme method':<28}" + "".join(f"{r:>22}" for r in roles))
    for key in dict.fromkeys(k for k, _ in sums):
        print(f"  {key:<28}" + "".join(f"{sums[(key, r)][0]:>11.3f} /{sums[(key, r)][1]:>9.3f}" for r in roles))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=8192,
                    help="calibration tokens (default: quantize's --calib-tokens default; tables before 2026-12-04 "
                         "used 4096)")
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="v3,v4")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--layer-error", default="", help="instead of the table: per-linear output-error diagnostic for "
                    "these comma-separated SPEC[:DAMP[:FLAGS]] (e.g. rtn,gptq,gptq:1.0,gptq:1.0:search; FLAGS "
                    "'/'-joined of act, during, search)")
    ap.add_argument("--codecs", default="nvfp4,mxfp4", help="--layer-error: the codecs to quantize with")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.layer_error:
        for fam in a.models.split(","):
            layer_error(fam, a.out, a.layer_error.split(","), a.calib_tokens, a.calib_seq_len, a.tokens, a.ctx,
                        tuple(a.codecs.split(",")))
        return
    opts = VerifyOptions(ctx=a.ctx, tokens=a.tokens)
    summary: dict[str, list] = {}
    calib = ("--calib", "--calib-tokens", str(a.calib_tokens), "--calib-seq-len", str(a.calib_seq_len))
    only = set(a.only.split(",")) if a.only else None
    for fam in a.models.split(","):
        ref = bundled_model(fam)
        d = a.out / f"tiny-{fam}"
        d.mkdir(parents=True, exist_ok=True)
        cache = d / "ref-logits.safetensors"
        rows = []
        for scheme, label, args in VARIANTS:
            if only and label not in only and label != "rtn":
                continue
            name = f"{scheme}-{label}".replace(" ", "_").replace("+", "_").replace("=", "_").replace("/", "_")
            t0 = time.time()
            quantize_cli(ref, d / name, args + (calib if ("gptq" in label or "awq" in label or "w4a4" in label) else ()))
            tq = time.time() - t0
            r = verify(ref, d / name, opts=None if cache.exists() else opts,
                       save_ref=None if cache.exists() else cache, ref_cache=cache if cache.exists() else None)
            (d / f"verify-{name}.json").write_text(json.dumps(json_report(r), indent=2))
            row = {"scheme": scheme, "method": label, "kld_mean": r["kld"]["mean"], "kld_p99": r["kld"]["p99"],
                   "top1": r["top1_agreement"], "ppl_ratio": r["ppl"]["ratio"],
                   "bits_per_weight": fp4_bits_per_weight(d / name), "quantize_s": tq}
            rows.append(row)
            print(f"tiny-{fam} {scheme} {label}: KLD {row['kld_mean']:.5f} ({tq:.0f} s)", flush=True)
        print(f"\ntiny-{fam}: {rows[0] and 'reference PPL'} {r['ppl']['ref']:.3f}, {r['settings']['scored_tokens']} "
              f"held-out tokens, ctx {r['settings']['ctx']}; calibration {a.calib_tokens} tokens x "
              f"{a.calib_seq_len} from the training split")
        print(f"  {'scheme':<6} {'method':<24} {'KLD mean':>9} {'x RTN':>6} {'KLD p99':>8} {'top-1':>7} "
              f"{'PPL ratio':>9} {'bits/w':>6}")
        base = {x["scheme"]: x["kld_mean"] for x in rows if x["method"] == "rtn"}
        for x in rows:
            x["kld_vs_rtn"] = x["kld_mean"] / base[x["scheme"]]
            print(f"  {x['scheme']:<6} {x['method']:<24} {x['kld_mean']:>9.5f} {x['kld_vs_rtn']:>6.3f} "
                  f"{x['kld_p99']:>8.4f} {x['top1']:>7.4f} {x['ppl_ratio']:>9.4f} {x['bits_per_weight']:>6.3f}")
        summary[f"tiny-{fam}"] = rows
    (a.out / "calibration.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
