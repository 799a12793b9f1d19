"""ONNX export benchmarks (issue #14), printed as side-by-side numbers (no timed assertions).

``layer``: stream one full-size block (MLA + MoE of layer ``--layer``) of a layer-subset checkpoint through the
exporter's weight path (FP8 dequantize -> int4 MatMulNBits/QMoE blocks -> ``.onnx.data``), e.g. the shared
``synth --preset v3-671b --layers 3`` fixture. Reports seconds, GB/s of source bytes read and the process's peak
RSS (``ru_maxrss``). The block's graph is not saved (it has no model inputs); the data file is the product.

    python bench/onnx_export.py layer /work/fullsize/v3-layer3 --layer 3 --out /tmp/onnx-bench

``decode``: greedy decode tokens/s of onnxruntime on an int4 ONNX export vs our runtime (float32, dequantized
weights) on the same checkpoint, same process, same prompt.

    python bench/onnx_export.py decode v4convert/data/tiny-v3 --tokens 64
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch


def bench_layer(src: Path, layer: int, out: Path, block: int) -> None:
    from v4convert.checkpoint import Checkpoint
    from v4convert.export.onnx.graph import ExternalData
    from v4convert.export.onnx.v3 import V3Graph

    out.mkdir(parents=True, exist_ok=True)
    ck = Checkpoint.open(src)
    data = ExternalData(out / "block.onnx.data", "block.onnx.data")
    b = V3Graph(ck, data, int4=True, block=block, accuracy_level=0, tick=lambda n: None)
    t0 = time.perf_counter()
    b.attention("x", layer, "cos", "sin", "mask", "causal")
    if b.a.arch.is_moe(layer):
        b.moe("x", layer)
    else:
        b.swiglu("x", f"model.layers.{layer}.mlp")
    size = data.close()
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"layer {layer}: read {b.bytes_read / 1e9:.2f} GB in {dt:.1f} s = {b.bytes_read / dt / 1e9:.3f} GB/s; "
          f"wrote {size / 1e9:.2f} GB ({data.n_tensors} tensors); peak RSS {rss:.2f} GiB "
          f"({rss * 2**30 / b.bytes_read * 100:.1f} % of the layer)")
    ck.close()
    shutil.rmtree(out)


def bench_decode(src: Path, tokens: int, threads: int) -> None:
    from v4convert.runtime import load

    from v4convert.artifacts.onnx import OnnxRunner
    from v4convert.export.onnx import Options, export

    torch.set_num_threads(threads)
    prompt = torch.arange(1, 17)[None]
    with tempfile.TemporaryDirectory() as tmp:
        path = export(src, Path(tmp) / "m", Options()).paths[0]
        runners = {"onnxruntime int4": OnnxRunner(path, threads=threads)}
        model = load(src, max_seq_len=prompt.shape[1] + tokens + 1)
        runners["runtime fp32"] = type("R", (), {"forward": lambda self, ids, pos: model(ids, pos)[0]})()
        res = {}
        for name, r in runners.items():
            nxt = int(r.forward(prompt, 0)[-1].argmax())
            t0 = time.perf_counter()
            for i in range(tokens):
                nxt = int(r.forward(torch.tensor([[nxt]]), prompt.shape[1] + i)[-1].argmax())
            res[name] = tokens / (time.perf_counter() - t0)
        base = res["runtime fp32"]
        for name, v in res.items():
            print(f"{name:18s} decode {v:8.1f} tok/s  ({v / base:.2f}x runtime)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("layer")
    a.add_argument("src", type=Path)
    a.add_argument("--layer", type=int, default=3)
    a.add_argument("--block", type=int, default=32)
    a.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "onnx-bench")
    d = sub.add_parser("decode")
    d.add_argument("src", type=Path)
    d.add_argument("--tokens", type=int, default=64)
    d.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "layer":
        bench_layer(args.src, args.layer, args.out, args.block)
    else:
        bench_decode(args.src, args.tokens, args.threads)


if __name__ == "__main__":
    main()
