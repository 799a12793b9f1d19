"""Dynamic expert routing, measured: top-p vs mean routed experts/token vs KLD vs decode tokens/s.

    python bench/dynamic_routing.py --out /tmp/dyn [--tokens 2048 --threads 1 --top-p 1.0,0.9,0.8,0.7,0.5]

For each bundled trained tiny model (tiny-v3, tiny-v4) runs the model against itself with
``verify --dynamic-top-p P`` (one reference pass per model, cached): the reference is the static top-k
routing, the artifact the same weights with dynamic routing. ``top-p 1.0`` keeps every top-k expert
(the dynamic code path at no saving: the speed baseline). Prints one table and writes OUT/dynamic.json.
Decode tokens/s are from verify's greedy passes; on tiny models routing is a small part of the time, so
the speed column shows the overhead/saving of the routing code, not what 40 % fewer expert FLOPs give on
a 671B model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from v4convert.runtime import DynamicRouting

from v4convert.demo import bundled_model
from v4convert.verify import VerifyOptions, default_ctx, json_report, verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="v3,v4")
    ap.add_argument("--top-p", default="1.0,0.9,0.8,0.7,0.5")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fam in a.models.split(","):
        src = bundled_model(fam)
        opts = VerifyOptions(ctx=default_ctx(src), tokens=a.tokens)
        k = int(json.loads((src / "config.json").read_text())["num_experts_per_tok"])
        cache = a.out / f"ref-{fam}.safetensors"
        cache.unlink(missing_ok=True)
        for i, p in enumerate(float(x) for x in a.top_p.split(",")):
            r = verify(src, src, opts=opts if i == 0 else None, save_ref=cache if i == 0 else None,
                       ref_cache=cache if i > 0 else None, dynamic_routing=DynamicRouting(top_p=p, k_min=1, k_max=k))
            ro = r["routing"]
            rows.append({"model": f"tiny-{fam}", "top_p": p, "static_top_k": k,
                         "experts_per_token": ro["experts_per_token"], "kld_mean": r["kld"]["mean"],
                         "kld_median": r["kld"]["median"], "top1": r["top1_agreement"],
                         "ppl_ratio": r["ppl"]["ratio"], "decode_tok_s": r["artifact"]["decode_tok_s"],
                         "ref_decode_tok_s": r["reference"]["decode_tok_s"]})
            (a.out / f"verify-{fam}-p{p}.json").write_text(json.dumps(json_report(r), indent=2))
    (a.out / "dynamic.json").write_text(json.dumps(rows, indent=2))
    print(f"{'model':9s} {'top-p':>6s} {'experts/tok':>12s} {'saved':>7s} {'KLD mean':>10s} {'top-1':>7s} "
          f"{'PPL ratio':>9s} {'decode tok/s':>13s} {'static tok/s':>13s}")
    for r in rows:
        print(f"{r['model']:9s} {r['top_p']:6.2f} {r['experts_per_token']:9.3f}/{r['static_top_k']:<2d} "
              f"{(1 - r['experts_per_token'] / r['static_top_k']) * 100:6.1f}% {r['kld_mean']:10.2e} "
              f"{r['top1'] * 100:6.2f}% {r['ppl_ratio']:9.4f} {r['decode_tok_s']:13.1f} {r['ref_decode_tok_s']:13.1f}")


if __name__ == "__main__":
    main()
