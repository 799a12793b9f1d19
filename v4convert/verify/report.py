"""Verify's text output: the report of one artifact and the comparison table of several."""
from __future__ import annotations

import math

# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _f(x: float, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{nd}f}"


def format_report(r: dict) -> str:
    s, k, p, dp, g, h = r["settings"], r["kld"], r["ppl"], r["delta_p"], r["greedy"], r["hidden"]
    lines = [
        f"reference {r['reference']['path']}{' (cached logits)' if r['reference']['from_cache'] else ''}",
        f"artifact  {r['artifact']['path']} ({r['artifact']['kind']}, {r['artifact']['dtype']})",
        *(f"          {n}" for n in r["artifact"].get("notes", [])),
        f"data      {r['data']['path']}: {s['windows']} windows x {s['ctx']} tokens = {s['scored_tokens']} scored, "
        f"reference top-{s['top_k']}{' (exact KL)' if s['kld_exact'] else ' + rest'}",
        "",
        f"{'':26s}{'reference':>14s}{'artifact':>14s}",
        f"{'perplexity':26s}{p['ref']:14.4f}{p['art']:14.4f}   ratio {p['ratio']:.4f}",
        f"{'prefill tokens/s':26s}{r['reference']['prefill_tok_s']:14.1f}{r['artifact']['prefill_tok_s']:14.1f}",
        f"{'decode tokens/s':26s}{r['reference']['decode_tok_s']:14.1f}{r['artifact']['decode_tok_s']:14.1f}",
        "",
        f"KL divergence   mean {_f(k['mean'], 6)}  median {_f(k['median'], 6)}  p99 {_f(k['p99'], 6)}  "
        f"max {_f(k['max'], 6)}",
        f"top-1 agreement {r['top1_agreement'] * 100:.2f} %",
        f"mean ln(PPL(art)/PPL(ref)) {_f(p['mean_ln_ratio'], 6)}",
        f"delta-p         mean {dp['mean'] * 100:+.3f} %  rms {dp['rms'] * 100:.3f} %  "
        f"p1 {dp['percentiles']['p1'] * 100:+.3f} %  median {dp['percentiles']['p50'] * 100:+.3f} %  "
        f"p99 {dp['percentiles']['p99'] * 100:+.3f} %",
        f"greedy          {g['prompts']} prompts x {g['tokens']} tokens: identical prefix "
        f"{g['prefix_agreement'] * 100:.1f} %, same token {g['position_agreement'] * 100:.1f} %",
    ]
    if r.get("routing"):
        ro = r["routing"]
        lines.append(f"routed experts  {ro['experts_per_token']:.3f} per token with --dynamic-top-p {ro['top_p']} "
                     f"(k {ro['k_min']}..{ro['k_max']}) vs static top-{ro['static_top_k']}: "
                     f"{ro['compute_saved'] * 100:.1f} % fewer routed-expert FLOPs")
    if h["available"]:
        lines.append(f"hidden rel err  ({h['tokens']} tokens) " +
                     "  ".join(f"L{i} {_f(e, 3)}" for i, e in enumerate(h["rel_err"])))
    else:
        lines.append(f"hidden rel err  n/a ({h['reason']})")
    t = r.get("thresholds", {})
    if t.get("failures"):
        lines += [""] + [f"FAIL: {f}" for f in t["failures"]]
    elif any(t.get(x) is not None for x in ("max_kld", "min_top1", "max_ppl_ratio")):
        lines += ["", "PASS: all thresholds met"]
    return "\n".join(lines)


COMPARE_COLUMNS = ("artifact", "MB", "KLD mean", "KLD p99", "top-1 %", "PPL", "PPL ratio", "dp rms %", "greedy %",
                   "decode tok/s")


def format_comparison(rows: list[tuple[str, float | None, dict]]) -> str:
    """One line per (label, size in bytes or None, report): the table ``demo`` and closing notes print."""
    w = max([28, *(len(label) + 1 for label, _, _ in rows)])        # the label column fits the longest label
    head = f"{COMPARE_COLUMNS[0]:{w}s}" + "".join(f"{c:>13s}" for c in COMPARE_COLUMNS[1:])
    out = [head, "-" * len(head)]
    for label, size, r in rows:
        vals = [f"{size / 1e6:.2f}" if size else "", f"{r['kld']['mean']:.5f}", f"{r['kld']['p99']:.5f}",
                f"{r['top1_agreement'] * 100:.2f}", f"{r['ppl']['art']:.3f}", f"{r['ppl']['ratio']:.4f}",
                f"{r['delta_p']['rms'] * 100:.3f}", f"{r['greedy']['prefix_agreement'] * 100:.1f}",
                f"{r['artifact']['decode_tok_s']:.1f}"]
        out.append(f"{label:{w}s}" + "".join(f"{v:>13s}" for v in vals))
    return "\n".join(out)
