"""Side by side with other quantizers: one model, one held-out text, one verify (ours) for every row.

    python bench/peers.py --out DIR [--json F] [--tokens 4096 --ctx 128 --calib-tokens 4096 --calib-seq-len 256]

    python bench/peers.py --out DIR --plot DIR/peers.png      # + KLD vs bits/w scatter, one marker per tool

Setup for the llm-compressor / AutoRound / ModelOpt rows (their own venv outside the repo, pinned versions,
torch pinned to the CPU build already here; about 1 min):
    bash bench/peers_venv.sh
(override with PEERS_PY=/path/to/python). Without it those rows stay in the table with their error.

Model: the bundled trained tiny V3 as published (FP8 block-scaled, v4convert/data/tiny-v3). Rows:
  - ours: ``v4convert quantize --fp4`` NVFP4 rtn / gptq+four-over-six (default recipe nvfp4-experts, and
    nvfp4-all-linear, the recipe matching llm-compressor's targets), MXFP4 rtn / awq+gptq (calibration on the
    bundled training split), straight from the FP8 release;
  - llama.cpp: ``v4convert export --gguf`` Q8_0 / Q4_0 / MXFP4 (our writer: MXFP4 experts, the rest at --type)
    and Q4_K_M (llama.cpp's own ``llama_model_quantize`` through llama-cpp-python);
  - llama.cpp's CLI (``--only llamacpp``, bench/peers_llama.py): our F32 GGUF -> llama-imatrix on the calibration
    windows -> llama-quantize Q4_K_M / IQ4_XS / MXFP4_MOE with and without it; ours (``gguf-im``): ``v4convert
    calibrate --imatrix`` + ``export --type Q4_K_M / IQ4_XS --imatrix``. Every GGUF row is also scored by
    ``llama-perplexity --kl-divergence`` (F32 GGUF base logits, same held-out text), printed beside verify's KLD;
  - llm-compressor: NVFP4A16 with QuantizationModifier (RTN) and GPTQModifier (bench/peers_llmc.py);
  - W4A4 (``--only quantize-w4a4,llmc-w4a4``): ours ``--activations w4a4`` (NVFP4 all-linear rtn / gptq, MXFP4
    rtn) and llm-compressor's W4A4 presets NVFP4 (RTN, GPTQ) / MXFP4 (RTN), scored with activation quantization;
  - AutoRound: the weight half of its NVFP4 / MXFP4 presets, RTN (iters=0) and SignRound (bench/peers_autoround.py);
  - ModelOpt: ``mtq.quantize`` W4A16_NVFP4 (max, awq_lite) and MXFP4 weights-only, ``export_hf_checkpoint``
    (bench/peers_modelopt.py);
  all three on a BF16 transformers copy we write with our reader (peers need this detour; we quantize the FP8
  release directly).
Every artifact is scored by ``v4convert.verify.verify`` against the release on the same held-out windows (one
cached reference pass). Wall s / peak RSS (VmHWM, polled) are the tool's own process, excluding verify.
bits/w = all stored bytes of the artifact's weight files x 8 / the model's parameter count (whole model,
so it includes the unquantized embedding/head/norms at their stored width).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import peers_llama as pl
import torch

REPO = Path(__file__).resolve().parents[1]
PEERS_PY = Path(os.environ.get("PEERS_PY", Path.home() / ".cache/v4convert-ci/peers-venv/bin/python"))
V4 = (sys.executable, "-m", "v4convert")
CALIB = ("--calib", "--calib-tokens", "{ct}", "--calib-seq-len", "{cl}")

# peer kind -> (its script in bench/, the distribution whose version the table shows); run with PEERS_PY
PEERS = {"llmc": ("peers_llmc.py", "llmcompressor"), "autoround": ("peers_autoround.py", "auto-round"),
         "modelopt": ("peers_modelopt.py", "nvidia-modelopt")}
LLAMA = "llama.cpp llama-quantize (F32 GGUF)"
# (tool, scheme, kind, args); kind: quantize | gguf | llamacpp | gguf-im | one of PEERS
ROWS = (
    ("v4convert", "NVFP4 rtn", "quantize", ("--scheme", "nvfp4", "--method", "rtn")),
    ("v4convert", "NVFP4 gptq+four-over-six", "quantize", ("--scheme", "nvfp4", "--method", "gptq+four-over-six",
                                                            *CALIB)),
    ("v4convert", "NVFP4 all-linear rtn", "quantize", ("--recipe", "nvfp4-all-linear", "--method", "rtn")),
    ("v4convert", "NVFP4 all-linear gptq+four-over-six", "quantize", ("--recipe", "nvfp4-all-linear", "--method",
                                                                       "gptq+four-over-six", *CALIB)),
    ("v4convert", "MXFP4 rtn", "quantize", ("--scheme", "mxfp4", "--method", "rtn")),
    ("v4convert", "MXFP4 awq+gptq", "quantize", ("--scheme", "mxfp4", "--method", "awq+gptq", *CALIB)),
    # the best calibrated methods of bench/calibration.md (2026-12-03): scale search + code refinement in GPTQ
    *(("v4convert", f"NVFP4{r and ' all-linear'} gptq+four-over-six scales=search refine=3", "quantize",
       (*(("--recipe", r) if r else ("--scheme", "nvfp4")), "--method", "gptq+four-over-six", "--gptq-scales", "search",
        "--gptq-refine", "3", *CALIB)) for r in ("", "nvfp4-all-linear")),
    ("v4convert", "MXFP4 awq+gptq act-order refine=3", "quantize",
     ("--scheme", "mxfp4", "--method", "awq+gptq", "--gptq-act-order", "--gptq-refine", "3", *CALIB)),
    ("llama.cpp (our GGUF writer)", "Q8_0", "gguf", ("--type", "q8_0", "--expert-type", "q8_0")),
    ("llama.cpp (our GGUF writer)", "Q4_0", "gguf", ("--type", "q4_0", "--expert-type", "q4_0")),
    ("llama.cpp (our GGUF writer)", "MXFP4_MOE (experts MXFP4, rest Q8_0)", "gguf",
     ("--type", "q8_0", "--expert-type", "mxfp4")),
    ("llama.cpp llama_model_quantize", "Q4_K_M (experts Q4_0)", "gguf", ("--type", "q4_k_m", "--expert-type", "q4_0")),
    # llama.cpp's own CLI on the F32 GGUF of our exporter, with / without llama-imatrix's imatrix (bench/peers_llama.py)
    *((LLAMA, f"{t}{im and ' + llama-imatrix'}", "llamacpp", (t, im))
      for t in ("Q4_K_M", "IQ4_XS", "MXFP4_MOE") for im in ("", "imatrix")),
    # ours: v4convert calibrate --imatrix, then export --type T --imatrix (llama.cpp's quantizer)
    *(("v4convert imatrix (GGUF)", f"{t} + our imatrix", "gguf-im", (t,)) for t in ("Q4_K_M", "IQ4_XS")),
    ("llm-compressor (BF16 detour)", "NVFP4A16 QuantizationModifier", "llmc", ("rtn",)),
    ("llm-compressor (BF16 detour)", "NVFP4A16 GPTQModifier", "llmc", ("gptq",)),
    ("llm-compressor (BF16 detour)", "MXFP4A16 QuantizationModifier", "llmc", ("rtn", "MXFP4A16")),
    # W4A4 (kinds quantize-w4a4 / llmc-w4a4): weights and activations FP4; our activation scales need --calib,
    # so the RTN row calibrates too (activation amax only). V3's absorbed kv_b_proj never runs in the
    # calibration forward (no activation scale), so our all-linear W4A4 keeps it as stored (FP8) with --keep.
    *(("v4convert", f"W4A4 NVFP4 all-linear {m} (kv_b_proj FP8)", "quantize-w4a4",
       ("--recipe", "nvfp4-all-linear", "--method", m, "--activations", "w4a4", "--keep",
        "model.layers.*.self_attn.kv_b_proj.weight", *CALIB)) for m in ("rtn", "gptq+four-over-six")),
    *(("v4convert", f"W4A4 MXFP4 {m} (experts recipe)", "quantize-w4a4",
       ("--scheme", "mxfp4", "--method", m, "--activations", "w4a4", *CALIB)) for m in ("rtn", "awq+gptq")),
    ("llm-compressor (BF16 detour)", "W4A4 NVFP4 QuantizationModifier", "llmc-w4a4", ("rtn", "NVFP4")),
    ("llm-compressor (BF16 detour)", "W4A4 NVFP4 GPTQModifier", "llmc-w4a4", ("gptq", "NVFP4")),
    ("llm-compressor (BF16 detour)", "W4A4 MXFP4 QuantizationModifier", "llmc-w4a4", ("rtn", "MXFP4")),
    ("llm-compressor (BF16 detour)", "W4A4 MXFP4 GPTQModifier", "llmc-w4a4", ("gptq", "MXFP4")),
    ("AutoRound (BF16 detour)", "NVFP4A16 RTN (iters=0)", "autoround", ("NVFP4", "0")),
    # its "light" recipe (iters 50, lr 5e-3): the default 200 iters took ~17 min here (bench/peers.md)
    ("AutoRound (BF16 detour)", "NVFP4A16 SignRound light", "autoround", ("NVFP4", "50", "5e-3")),
    ("AutoRound (BF16 detour)", "MXFP4A16 RTN (iters=0)", "autoround", ("MXFP4", "0")),
    ("ModelOpt (BF16 detour)", "W4A16_NVFP4 max", "modelopt", ("W4A16_NVFP4_CFG",)),
    ("ModelOpt (BF16 detour)", "W4A16_NVFP4 awq_lite", "modelopt", ("W4A16_NVFP4_CFG:awq_lite",)),
    ("ModelOpt (BF16 detour)", "MXFP4 weights-only max", "modelopt", ("MXFP4_DEFAULT_CFG:weights-only",)),
)
MARKERS = {"v4convert": "o", "llama.cpp": "s", "llm-compressor": "^", "AutoRound": "D", "ModelOpt": "v"}


def timed(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``cmd``; (wall s, peak RSS MiB of the process, '' or its last error line)."""
    t0 = time.time()
    hwm = 0
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd="/tmp")
        # VmHWM of the exec'd process itself, polled: the child's ru_maxrss would include this (large) bench
        # process's RSS at fork time, which Linux carries across exec.
        while True:
            pid, status, _ = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                line = next(x for x in open(f"/proc/{p.pid}/status") if x.startswith("VmHWM:"))
                hwm = max(hwm, int(line.split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.02)
    wall = time.time() - t0
    err = ""
    if os.waitstatus_to_exitcode(status) != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        err = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "failed")
    return wall, hwm / 1024, err.strip()[:300]


def write_bf16_copy(ref: Path, out: Path) -> None:
    """The release dequantized by our reader into a plain BF16 transformers directory (what peers load)."""
    from safetensors.torch import save_file

    from v4convert.checkpoint import Checkpoint
    out.mkdir(parents=True, exist_ok=True)
    with Checkpoint.open(ref) as ck:
        save_file({n: ck.dequantize(n).to(torch.bfloat16).contiguous() for n in ck.names()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ref / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (ref / f).exists():
            shutil.copy(ref / f, out / f)


def stored_bytes(art: Path) -> int:
    return sum(p.stat().st_size for p in ([art] if art.is_file() else [*art.glob("*.safetensors"),
                                                                           *art.glob("*.gguf")]))


def llama_prep(st: dict, a: argparse.Namespace, ref: Path, kind: str) -> str | None:
    """Once per run, what the GGUF imatrix rows share: our imatrix (``gguf-im``), llama.cpp's tools, the F32 GGUF
    of our exporter, llama-perplexity's base logits (held-out text, users' BOS run and the aligned run) and
    llama-imatrix's imatrix on the calibration windows (``llamacpp``). An error line for the row, or None."""
    from v4convert.calib.data import calibration_windows
    from v4convert.verify import DEFAULT_DATA
    if kind == "gguf-im" and "ours_im" not in st:
        im = a.out / "tiny-v3.v4convert-imatrix.gguf"
        st["ours_im"] = (im, *timed([*V4, "calibrate", str(ref), "--calib", "--calib-tokens", str(a.calib_tokens),
                                     "--calib-seq-len", str(a.calib_seq_len), "--imatrix", str(im), "--overwrite",
                                     "--no-progress"], a.out / "log-calibrate-imatrix.txt"))
    if "tools" not in st:
        st["tools"] = pl.tools_dir()
    if st["tools"] is None:
        return "llama.cpp tools not built (bash .ci/llama_tools.sh failed)"
    if "f32" not in st:
        f32 = a.out / "tiny-v3-F32.gguf"
        st["f32_s"], _, err = timed([*V4, "export", str(ref), "--gguf", "--type", "F32", "--out", str(f32),
                                     "--overwrite", "--no-modelfile", "--no-progress"], a.out / "log-export-F32.txt")
        if err:
            return f"F32 export: {err}"
        st["f32"] = f32
        print(f"F32 GGUF for llama.cpp's tools: {st['f32_s']:.1f} s", flush=True)
        for aligned in (False, True):       # as many chunks as verify's windows (make_windows)
            st["base", aligned] = a.out / f"llama-base-{'aligned' if aligned else 'bos'}.kld"
            pl.perplexity_base(st["tools"], f32, DEFAULT_DATA, a.ctx, math.ceil(a.tokens / (a.ctx - 1)),
                               st["base", aligned], aligned)
    if kind == "llamacpp" and "llama_im" not in st:
        cw = calibration_windows(ref, None, a.calib_tokens, a.calib_seq_len).windows
        txt = pl.calib_text(ref, cw, a.out / "calib-train.txt")
        im = a.out / "tiny-v3.llama-imatrix.gguf"
        st["llama_im"] = (im, *timed(pl.imatrix_cmd(st["tools"], st["f32"], txt, a.calib_seq_len, cw.shape[0], im),
                                     a.out / "log-llama-imatrix.txt"))
    return None


def peer_version(py: Path, mod: str) -> str:
    try:
        return subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version('{mod}'))"],
                              capture_output=True, text=True, timeout=120).stdout.strip() or "not installed"
    except OSError:
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None, help="where to write the numbers (default OUT/peers.json)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--only", default="", help="comma-separated kinds to run (quantize,quantize-w4a4,gguf,"
                                                "llamacpp,gguf-im,llmc,llmc-w4a4,autoround,modelopt; default all)")
    ap.add_argument("--plot", type=Path, default=None, help="write a KLD-vs-bits/w scatter PNG here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from v4convert.calib.data import calibration_windows
    from v4convert.checkpoint import Checkpoint
    from v4convert.demo import bundled_model
    from v4convert.verify import VerifyOptions, json_report, verify

    ref = bundled_model("v3")
    a.out.mkdir(parents=True, exist_ok=True)
    with Checkpoint.open(ref) as ck:
        n_params = sum(math.prod(ck.tensor_info(n).shape) for n in ck.names())
    cache = a.out / "ref-logits.safetensors"
    if cache.exists():
        cache.unlink()
    bf16 = a.out / "tiny-v3-bf16"
    calib_pt = a.out / "calib-windows.pt"
    only = set(a.only.split(",")) if a.only else None
    import llama_cpp

    import v4convert
    versions = {"quantize": f"v4convert {v4convert.__version__}, torch {torch.__version__}",
                "gguf": f"v4convert {v4convert.__version__}, llama-cpp-python {llama_cpp.__version__}"}
    for kind, (_, dist) in PEERS.items():
        versions[kind] = f"{dist} {peer_version(PEERS_PY, dist)}"
    versions["llamacpp"] = f"llama.cpp tools (llama-cpp-python {llama_cpp.__version__} source)"
    versions["gguf-im"] = versions["gguf"]
    versions["quantize-w4a4"], versions["llmc-w4a4"] = versions["quantize"], versions["llmc"]
    rows: list[dict] = []
    st: dict = {}           # shared state of the llama.cpp / imatrix rows (llama_prep)
    for tool, scheme, kind, args in ROWS:
        if only and kind not in only:
            continue
        name = scheme.split(" (")[0].replace(" ", "_").replace("+", "_")
        row = {"tool": tool, "scheme": scheme, "version": versions[kind], "error": None}
        args = tuple(x.format(ct=a.calib_tokens, cl=a.calib_seq_len) for x in args)
        imatrix, prep_err = None, None      # (path, wall s, RSS MiB, error) of the imatrix the row uses
        if kind in ("llamacpp", "gguf-im", "gguf"):    # gguf: only for the llama-perplexity score
            prep_err = llama_prep(st, a, ref, kind)
            if kind == "llamacpp" and args[1]:
                imatrix = st.get("llama_im")
            elif kind == "gguf-im":
                imatrix = st["ours_im"]
            prep_err = (prep_err if kind == "llamacpp" else None) or (imatrix and imatrix[3] and
                                                                       f"imatrix: {imatrix[3]}")
        if kind in ("quantize", "quantize-w4a4"):
            art = a.out / f"ours-{name}"
            cmd = [*V4, "quantize", str(ref), "--fp4", "--out", str(art), "--workers", "1", "--overwrite", *args]
        elif kind == "gguf":
            art = a.out / f"gguf-{name}.gguf"
            cmd = [*V4, "export", str(ref), "--gguf", "--out", str(art), "--overwrite", "--no-modelfile", *args]
        elif kind == "llamacpp":
            art = a.out / f"llama-{name}.gguf"
            cmd = pl.quantize_cmd(st["tools"], st["f32"], art, args[0], imatrix and imatrix[0]) if not prep_err else []
        elif kind == "gguf-im":
            art = a.out / f"gguf-{name}.gguf"
            cmd = [*V4, "export", str(ref), "--gguf", "--type", args[0], "--imatrix", str(imatrix[0]), "--out", str(art),
                   "--overwrite", "--no-modelfile"]
        else:
            art = a.out / f"{kind}-{name}"
            if not bf16.exists():
                t0 = time.time()
                write_bf16_copy(ref, bf16)
                print(f"BF16 detour for peers: {time.time() - t0:.1f} s", flush=True)
            if not calib_pt.exists():
                torch.save(calibration_windows(ref, None, a.calib_tokens, a.calib_seq_len).windows, calib_pt)
            if art.exists():
                shutil.rmtree(art)
            # -P: bench/ must not shadow packages transformers imports
            script = REPO / "bench" / PEERS[kind.removesuffix("-w4a4")][0]
            cmd = [str(PEERS_PY), "-P", str(script), str(bf16), str(calib_pt), str(art), *args]
        if kind.removesuffix("-w4a4") in PEERS and not PEERS_PY.exists():
            row["error"] = f"{PEERS_PY}: no peers venv (run bash bench/peers_venv.sh)"
        elif prep_err:
            row["error"] = prep_err
        else:
            row["wall_s"], row["peak_rss_mib"], err = timed(cmd, a.out / f"log-{kind}-{name}.txt")
            row["error"] = err or None
            if imatrix:         # the imatrix pass is part of the row's cost (made once, used by each type)
                row["imatrix_s"] = imatrix[1]
                row["wall_s"], row["peak_rss_mib"] = row["wall_s"] + imatrix[1], max(row["peak_rss_mib"], imatrix[2])
        if kind.removesuffix("-w4a4") in PEERS and not row["error"]:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if not (art / f).exists():
                    shutil.copy(ref / f, art / f)
        # AutoRound was asked for weights only (act_bits=16) but its export declares W4A4 input activations (NVFP4:
        # static, with no input_global_scale in the file; MXFP4: dynamic): scored weights-only as requested, and
        # once more as declared (what a serving engine would do with the file), kept in the row.
        weights_only = kind == "autoround"
        if not row["error"]:
            try:
                r = verify(ref, art, opts=None if cache.exists() else VerifyOptions(ctx=a.ctx, tokens=a.tokens),
                           save_ref=None if cache.exists() else cache, ref_cache=cache if cache.exists() else None,
                           act_quant=not weights_only)
                if weights_only:
                    row["scheme"] += " [config's W4A4 ignored]"
                    try:
                        row["as_declared_kld_mean"] = verify(ref, art, ref_cache=cache)["kld"]["mean"]
                    except Exception as e:
                        row["as_declared_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:250]}"
                (a.out / f"verify-{kind}-{name}.json").write_text(json.dumps(json_report(r), indent=2))
                row.update(kld_mean=r["kld"]["mean"], kld_p99=r["kld"]["p99"], top1=r["top1_agreement"],
                           ppl_ratio=r["ppl"]["ratio"], bits_per_weight=8 * stored_bytes(art) / n_params,
                           ref_ppl=r["ppl"]["ref"], scored_tokens=r["settings"]["scored_tokens"])
                if art.suffix == ".gguf" and st.get("f32"):     # llama.cpp's own score of the same file
                    row["kld_mean_second_halves"] = pl.matched_kld(r["_per_token_kld"], r["settings"]["windows"],
                                                                   a.ctx)
                    for aligned in (False, True):
                        key = "llama_perplexity" + ("_aligned" if aligned else "")
                        try:
                            row[key] = pl.perplexity_kld(st["tools"], art, st["base", aligned], aligned,
                                                         a.out / f"log-llama-perplexity-{name}{'-aligned' * aligned}.txt")
                        except RuntimeError as e:
                            row[key] = {"error": str(e)}
            except Exception as e:      # a peer artifact our verify cannot load stays a row with the reason
                row["error"] = f"our verify: {type(e).__name__}: {str(e).splitlines()[0][:250]}"
        rows.append(row)
        print(f"{tool} {scheme}: " + (f"KLD {row['kld_mean']:.5f}" if "kld_mean" in row else f"ERROR {row['error']}"),
              flush=True)
    print(table(rows))
    if any("llama_perplexity" in r for r in rows):
        print(crosscheck(rows))
    if a.plot:
        plot(rows, a.plot)
    out = a.json or a.out / "peers.json"
    out.write_text(json.dumps({"model": "tiny-v3 (bundled, FP8 release)", "params": n_params, "ctx": a.ctx,
                               "tokens": a.tokens, "rows": rows}, indent=2))


def plot(rows: list[dict], png: Path) -> None:
    """KLD mean (log y) vs bits/w, one marker per tool, every scored row labelled with its scheme."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 6.5))
    scored = [r for r in rows if "kld_mean" in r]
    for tool in dict.fromkeys(r["tool"] for r in scored):
        pts = [r for r in scored if r["tool"] == tool]
        ax.scatter([r["bits_per_weight"] for r in pts], [r["kld_mean"] for r in pts], s=45, label=tool,
                   marker=next((m for k, m in MARKERS.items() if tool.startswith(k)), "x"))
    # points carry their number in the table order; the key beside the axes names each one (labels with the
    # full scheme overlap: most FP4 rows sit at 5.83 bits/w)
    placed: list[tuple[float, float]] = []      # (bits/w, log10 KLD) of numbers already drawn
    for n, r in enumerate(scored, 1):
        x, y = r["bits_per_weight"], math.log10(r["kld_mean"])
        near = sum(abs(x - px) < 0.15 and abs(y - py) < 0.03 for px, py in placed)
        placed.append((x, y))
        ax.annotate(str(n), (x, r["kld_mean"]), fontsize=7, xytext=(6 + 11 * near, -3), textcoords="offset points")
    key = "\n".join(f"{n:>2}  {r['tool'].split(' (')[0]}: {r['scheme']}" for n, r in enumerate(scored, 1))
    fig.text(0.70, 0.5, key, fontsize=7, family="monospace", va="center")
    ax.set_yscale("log")
    ax.set_xlabel("bits/weight (all stored weight bytes x 8 / parameters, whole model)")
    ax.set_ylabel("KLD mean vs the FP8 release (nats/token, our verify)")
    ax.set_title("tiny V3: quantizers side by side (bench/peers.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.69, 1))
    fig.savefig(png, dpi=130)
    plt.close(fig)


def crosscheck(rows: list[dict]) -> str:
    """GGUF rows: our verify's KLD mean beside llama-perplexity --kl-divergence's (bench/peers_llama.py)."""
    lines = [f"{'tool':<37} {'scheme':<38} {'verify':>8} {'verify':>8} {'llama-ppl':>9} {'ratio':>6} {'llama-ppl':>9}",
             f"{'':<37} {'':<38} {'all pos':>8} {'2nd half':>8} {'aligned':>9} {'':>6} {'BOS run':>9}"]
    for r in rows:
        if "llama_perplexity" in r:
            al, us = r["llama_perplexity_aligned"].get("kld_mean"), r["llama_perplexity"].get("kld_mean")
            m = r["kld_mean_second_halves"]
            lines.append(f"{r['tool']:<37} {r['scheme']:<38} {r['kld_mean']:>8.5f} {m:>8.5f} "
                         + (f"{al:>9.5f} {al / m:>6.3f}" if al is not None else f"{'error':>9} {'':>6}")
                         + (f" {us:>9.5f}" if us is not None else f" {'error':>9}"))
            errs = [r[k]["error"] for k in ("llama_perplexity_aligned", "llama_perplexity") if "error" in r[k]]
            lines += [f"    llama-perplexity: {e}" for e in errs]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    w = max([38, *(len(r["scheme"]) for r in rows)])       # the W4A4 rows' schemes are longer
    head = (f"{'tool':<37} {'scheme':<{w}} {'bits/w':>6} {'KLD mean':>9} {'KLD p99':>8} {'top-1':>7} "
            f"{'PPL ratio':>9} {'wall s':>7} {'RSS MiB':>8}  version")
    lines = [head]
    for r in rows:
        if "kld_mean" in r:
            lines.append(f"{r['tool']:<37} {r['scheme']:<{w}} {r['bits_per_weight']:>6.2f} {r['kld_mean']:>9.5f} "
                         f"{r['kld_p99']:>8.4f} {r['top1']:>7.4f} {r['ppl_ratio']:>9.4f} {r['wall_s']:>7.1f} "
                         f"{r['peak_rss_mib']:>8.0f}  {r['version']}")
        else:
            lines.append(f"{r['tool']:<37} {r['scheme']:<{w}} error ({r['version']}): {r['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
