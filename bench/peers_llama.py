"""llama.cpp rows of bench/peers.py, run with llama.cpp's own tools (``bash .ci/llama_tools.sh`` builds them):

    F32 GGUF (our exporter) -> llama-imatrix (calibration windows) -> llama-quantize TYPE [--imatrix]
    and scored, besides our verify, by ``llama-perplexity --kl-divergence`` against base logits of the F32 GGUF.

Tokenization. Our GGUF writer labels every tokenizer ``tokenizer.ggml.pre = deepseek-v3``; the bundled tiny
models' tokenizer.json is a plain GPT-2 ByteLevel BPE (``pre_tokenizer: ByteLevel, use_regex``), which llama.cpp
calls ``gpt-2``. With the wrong label llama.cpp's regex merges e.g. "\\n\\n" into one token (id 570 where
tokenizers gives 200, 200): llama-perplexity then scores another token stream (PPL 93.9 vs 70.9 on the same text).
All llama.cpp tool runs here pass ``--override-kv tokenizer.ggml.pre=str:gpt-2`` (what a correct label would
give; checked: identical ids to tokenizers on the held-out windows and the calibration windows).

BOS. The model declares add_bos_token; llama-imatrix / llama-perplexity then put BOS at the first position of
every chunk (replacing that token). Our calibration and verify windows carry no BOS. ``aligned`` runs override
``tokenizer.ggml.add_bos_token=bool:false`` so that llama.cpp sees exactly our windows; the "users'" perplexity
run keeps BOS (llama.cpp's default).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EOS_TEXT = "<｜end▁of▁sentence｜>"
PRE_FIX = "tokenizer.ggml.pre=str:gpt-2"
NO_BOS = "tokenizer.ggml.add_bos_token=bool:false"
FIRST = 0.5      # llama-perplexity scores positions n_ctx/2 .. n_ctx-2 of each chunk (the second half)


def tools_dir() -> Path | None:
    """bin dir of llama-quantize / llama-imatrix / llama-perplexity (builds them once, cached), None if it fails."""
    p = subprocess.run(["bash", str(REPO / ".ci" / "llama_tools.sh")], capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    return Path(lines[-1]) if p.returncode == 0 and lines else None


def overrides(aligned: bool) -> list[str]:
    return ["--override-kv", ",".join([PRE_FIX, NO_BOS] if aligned else [PRE_FIX])]


def calib_text(ref: Path, windows: torch.Tensor, out: Path) -> Path:
    """The training-split documents the calibration windows were cut from, joined by the EOS token text (as
    ``calibration_windows`` joins their ids), for ``llama-imatrix --parse-special``."""
    from tokenizers import Tokenizer

    from v4convert.calib.data import training_split_texts
    tok = Tokenizer.from_file(str(ref / "tokenizer.json"))
    txt, n = "", 0
    for t in training_split_texts():
        txt += t + EOS_TEXT
        n += len(tok.encode(t, add_special_tokens=False).ids) + 1
        if n >= windows.numel():
            break
    out.write_text(txt, encoding="utf-8")
    return out


def imatrix_cmd(tools: Path, f32: Path, txt: Path, seq_len: int, chunks: int, out: Path) -> list[str]:
    """llama-imatrix as documented (``-m -f -o``), chunks of ``seq_len`` = our calibration windows (aligned)."""
    return [str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(txt), "-c", str(seq_len), "--chunks",
            str(chunks), "-o", str(out), "--no-ppl", "--parse-special", "-t", "1", *overrides(True)]


def quantize_cmd(tools: Path, f32: Path, out: Path, qtype: str, imatrix: Path | None) -> list[str]:
    return [str(tools / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []), str(f32), str(out),
            qtype, "1"]


def perplexity_base(tools: Path, f32: Path, heldout: Path, ctx: int, chunks: int, base: Path, aligned: bool) -> None:
    """``--kl-divergence-base``: the F32 GGUF's log-probs on the held-out text (llama.cpp stores them as uint16)."""
    subprocess.run([str(tools / "llama-perplexity"), "-m", str(f32), "-f", str(heldout), "-c", str(ctx), "--chunks",
                    str(chunks), "-t", "1", "--kl-divergence-base", str(base), *overrides(aligned)], check=True,
                   capture_output=True)


def _num(pat: str, text: str) -> float:
    m = re.search(pat, text)
    if not m:
        raise RuntimeError(f"llama-perplexity output has no {pat!r}")
    return float(m.group(1))


def perplexity_kld(tools: Path, gguf: Path, base: Path, aligned: bool, log: Path) -> dict:
    """``llama-perplexity --kl-divergence`` of ``gguf`` against ``base``: mean / p99 KLD, same-top, PPL ratio.

    Retried up to 10 times when the summary is missing: on this loaded 2-core machine up to 1 run in 3 exits 0
    with its output cut short (after some chunk line, or before the table), the same with pipes or a file
    (not reproduced on a quieter moment: 0 of 32); the lines that are there equal those of complete runs, and
    complete runs of one file give identical numbers. ``attempts`` in the result says how many runs it took."""
    cmd = [str(tools / "llama-perplexity"), "-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence",
           "-t", "1", *overrides(aligned)]
    for attempt in range(1, 11):
        p = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text(p.stdout + p.stderr)
        if p.returncode == 0 and "Same top p:" in p.stdout + p.stderr:      # its last summary line
            break
    else:
        last = (p.stderr or p.stdout).strip().splitlines()
        raise RuntimeError(f"llama-perplexity exit {p.returncode}, no summary in 10 runs: {last[-1] if last else ''}"
                           [:250])
    t = p.stdout + p.stderr
    return {"kld_mean": _num(r"Mean\s+KLD:\s+(-?[\d.]+)", t), "kld_p99": _num(r"99\.0%\s+KLD:\s+(-?[\d.]+)", t),
            "top1": _num(r"Same top p:\s+(-?[\d.]+)", t) / 100,
            "ppl_ratio": _num(r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+(-?[\d.]+)", t),
            "n_chunks": int(_num(r"computing over (\d+) chunks", t)), "attempts": attempt}


def matched_kld(per_token: torch.Tensor, n_windows: int, ctx: int) -> float:
    """Our verify's per-token KLD ``[W * (ctx-1)]`` restricted to the positions llama-perplexity scores
    (logits at positions ctx/2 .. ctx-2 of each window, predicting tokens ctx/2+1 .. ctx-1)."""
    return float(per_token.view(n_windows, ctx - 1)[:, ctx // 2:].double().mean())
