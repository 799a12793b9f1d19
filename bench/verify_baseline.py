"""Quality baseline: the bundled trained tiny models x the FP4 recipes, verified against their FP8/FP4 release.

    python bench/verify_baseline.py --out /tmp/baseline [--tokens 4096 --ctx 128 --threads 1]

For each model (tiny-v3, tiny-v4) and variant (NVFP4 RTN / MSE / four-over-six, MXFP4 floor / round-up) runs
``v4convert quantize`` and ``verify`` (one reference pass per model, cached), prints the comparison table
and writes every report to OUT/<model>/verify-<variant>.json and OUT/baseline.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from v4convert.demo import Variant, artifact_bytes, bundled_model, quantize_cli
from v4convert.verify import VerifyOptions, format_comparison, json_report, verify

VARIANTS = (
    Variant("NVFP4 RTN", "nvfp4-rtn", ("--scheme", "nvfp4", "--scale-method", "rtn")),
    Variant("NVFP4 MSE", "nvfp4-mse", ("--scheme", "nvfp4", "--scale-method", "mse")),
    Variant("NVFP4 four-over-six", "nvfp4-4o6", ("--scheme", "nvfp4", "--scale-method", "four-over-six")),
    Variant("MXFP4 floor", "mxfp4-floor", ("--scheme", "mxfp4", "--mx-rule", "floor")),
    Variant("MXFP4 round-up", "mxfp4-roundup", ("--scheme", "mxfp4", "--mx-rule", "round-up")),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="v3,v4")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    opts = VerifyOptions(ctx=a.ctx, tokens=a.tokens)
    summary: dict[str, list] = {}
    for fam in a.models.split(","):
        ref = bundled_model(fam)
        d = a.out / f"tiny-{fam}"
        d.mkdir(parents=True, exist_ok=True)
        cache = d / "ref-logits.safetensors"
        if cache.exists():
            cache.unlink()
        rows = []
        for i, v in enumerate(VARIANTS):
            quantize_cli(ref, d / v.dirname, v.quantize_args)
            r = verify(ref, d / v.dirname, opts=opts if i == 0 else None,
                       save_ref=cache if i == 0 else None, ref_cache=cache if i else None)
            (d / f"verify-{v.dirname}.json").write_text(json.dumps(json_report(r), indent=2))
            rows.append((v.label, artifact_bytes(d / v.dirname), r))
            print(f"tiny-{fam} {v.label}: KLD {r['kld']['mean']:.5f} top-1 {r['top1_agreement']:.4f}", flush=True)
        first = rows[0][2]
        print(f"\ntiny-{fam} ({artifact_bytes(ref) / 1e6:.2f} MB release, reference PPL {first['ppl']['ref']:.3f}, "
              f"{first['settings']['scored_tokens']} held-out tokens, ctx {first['settings']['ctx']})")
        print(format_comparison(rows), flush=True)
        summary[f"tiny-{fam}"] = [{"variant": label, "bytes": size, **json_report(r)} for label, size, r in rows]
    (a.out / "baseline.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
