"""GGUF K-quants with vs without our importance matrix, on the bundled trained tiny V3, same held-out windows.

    python bench/imatrix.py --out /tmp/imatrix-bench [--types Q4_K_M,Q3_K_M --calib-tokens 8192
                                                      --calib-seq-len 128 --tokens 4096 --ctx 128 --threads 1
                                                      --llama-tools "$(bash .ci/llama_tools.sh | tail -1)"]

Runs ``v4convert calibrate tiny-v3 --calib --imatrix OUT/tiny-v3.imatrix.gguf`` (bundled *training* split), then
for each type ``export --gguf --type T`` without and with ``--imatrix`` (llama.cpp's quantizer), and ``verify``
each against the release on the held-out text (one cached reference pass). Prints verify's KLD mean / median /
p99, top-1 and PPL ratio per row and the with/without ratio of the mean KLD; writes OUT/imatrix.json.
Target (issue 12): Q4_K_M with our imatrix has a lower mean KLD than without.

Note on the tiny model: its rows (192, 96, 384 columns) are mostly not whole 256-blocks, so llama.cpp's
Q4_K_M falls back to q5_0 for most tensors (q6_K -> q8_0, which ignores an imatrix); both q4_K and q5_0 use it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from v4convert.cli import main
from v4convert.demo import bundled_model
from v4convert.verify import VerifyOptions, json_report, verify


def cli(*args: str) -> float:
    t0 = time.time()
    try:
        main.main(list(args), standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    return time.time() - t0


def llama_imatrix(tools: Path, ref: Path, a) -> Path:
    """llama-imatrix on an F32 GGUF of ``ref`` over the same training-split text, ``--calib-seq-len`` chunks."""
    import subprocess

    from v4convert.calib.data import training_split_texts
    txt, f32 = a.out / "train.txt", a.out / "tiny-v3-F32.gguf"
    txt.write_text("".join(training_split_texts()))
    cli("export", str(ref), "--gguf", "--type", "F32", "--out", str(f32), "--no-modelfile", "--overwrite", "--no-progress")
    out = a.out / "tiny-v3.llama-imatrix.gguf"
    chunks = a.calib_tokens // a.calib_seq_len
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(txt), "-c", str(a.calib_seq_len),
                    "--chunks", str(chunks), "-o", str(out), "--no-ppl", "-t", str(a.threads)], check=True,
                   capture_output=True)
    return out


def run() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-tools", default=None, help="bin dir of llama.cpp's tools (bash .ci/llama_tools.sh): adds "
                    "rows quantized with an imatrix made by llama-imatrix on the same text")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref = bundled_model("v3")
    a.out.mkdir(parents=True, exist_ok=True)
    im = a.out / "tiny-v3.imatrix.gguf"
    tc = cli("calibrate", str(ref), "--calib", "--calib-tokens", str(a.calib_tokens), "--calib-seq-len",
             str(a.calib_seq_len), "--imatrix", str(im), "--overwrite", "--no-progress")
    ims = [("ours", im)]
    if a.llama_tools:                 # llama.cpp's own llama-imatrix on the same training text, as a reference
        ims.append(("llama-imatrix", llama_imatrix(Path(a.llama_tools), ref, a)))
    cache = a.out / "ref-logits.safetensors"
    cache.unlink(missing_ok=True)
    opts = VerifyOptions(ctx=a.ctx, tokens=a.tokens)
    rows = []
    for t in a.types.split(","):
        for with_im, path in [("no", None), *((k, p) for k, p in ims)]:
            art = a.out / f"tiny-v3-{t}{'' if path is None else '-' + with_im}.gguf"
            te = cli("export", str(ref), "--gguf", "--type", t, "--out", str(art), "--no-modelfile", "--overwrite",
                     "--no-progress", *(["--imatrix", str(path)] if path else []))
            r = verify(ref, art, opts=None if cache.exists() else opts,
                       save_ref=None if cache.exists() else cache, ref_cache=cache if cache.exists() else None)
            (a.out / f"verify-{art.stem}.json").write_text(json.dumps(json_report(r), indent=2))
            rows.append({"type": t, "imatrix": with_im, "kld_mean": r["kld"]["mean"], "kld_median": r["kld"]["median"],
                         "kld_p99": r["kld"]["p99"], "top1": r["top1_agreement"], "ppl_ratio": r["ppl"]["ratio"],
                         "bytes": art.stat().st_size, "export_s": te})
            print(f"{t} imatrix={with_im}: KLD {rows[-1]['kld_mean']:.6f}", flush=True)
    print(f"\ntiny-v3: reference PPL {r['ppl']['ref']:.3f}, {r['settings']['scored_tokens']} held-out tokens, ctx "
          f"{r['settings']['ctx']}; imatrix from {a.calib_tokens} training-split tokens x {a.calib_seq_len} "
          f"({tc:.0f} s)")
    print(f"  {'type':<7} {'imatrix':<13} {'KLD mean':>9} {'x none':>7} {'median':>9} {'p99':>8} {'top-1':>7} "
          f"{'PPL ratio':>9} {'bytes':>10}")
    base: dict[str, float] = {}
    for row in rows:
        if row["imatrix"] == "no":
            base[row["type"]] = row["kld_mean"]
        row["x_without"] = row["kld_mean"] / base[row["type"]]
        print(f"  {row['type']:<7} {row['imatrix']:<13} {row['kld_mean']:>9.6f} "
              f"{row['x_without']:>7.3f} {row['kld_median']:>9.6f} {row['kld_p99']:>8.5f} {row['top1'] * 100:>6.2f}% "
              f"{row['ppl_ratio']:>9.4f} {row['bytes']:>10,}")
    (a.out / "imatrix.json").write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "rows": rows},
                                                   indent=2))


if __name__ == "__main__":
    run()
