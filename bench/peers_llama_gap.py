"""Where our verify's KLD and llama-perplexity's differ on one GGUF (bench/peers.md, llama.cpp cross-check).

    python bench/peers_llama_gap.py RUN_DIR/tiny-v3-F32.gguf RUN_DIR/llama-Q4_K_M.gguf [--tokens 4096 --ctx 128]

Same token windows as verify (held-out text, our tokenizer, no BOS), the positions llama-perplexity scores
(second half of each window). verify runs a GGUF artifact in llama.cpp itself (llama-cpp-python, F32 KV cache)
against our runtime on the FP8 release, keeping the reference's top-256 log-probs + one "rest" bucket (a lower
bound of the KL). Prints the mean KLD on those positions of:
  verify       verify's own per-token KLD (top-256 + rest)
  exact        the same two engines, full vocabulary, float64
  llama-only   llama.cpp on the F32 GGUF vs llama.cpp on the quantized GGUF, full vocabulary, F32 / F16 KV cache
               (llama-perplexity's engines, without its uint16 storage of the base log-probs)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp
import numpy as np
import torch


def kld(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p || q) from log-probs ``[..., V]`` (float64)."""
    return (lp.exp() * (lp - lq)).sum(-1)


def llama_logp(gguf: Path, windows: torch.Tensor, f32_kv: bool = True) -> torch.Tensor:
    """llama.cpp's log-probs ``[W, L, V]``, one window per fresh context (as llama-perplexity's chunks)."""
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}          # ggml_type F32; default F16
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          n_ubatch=windows.shape[1], logits_all=True, n_threads=1, n_gpu_layers=0, verbose=False, **kv)
    out = []
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        out.append(torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32)))
    llm.close()
    return torch.log_softmax(torch.stack(out).double(), -1)


def ours_logp(ckpt: Path, windows: torch.Tensor) -> torch.Tensor:
    from v4convert.runtime import load
    model = load(ckpt, max_seq_len=windows.shape[1])
    with torch.no_grad():
        return torch.log_softmax(torch.stack([model(w[None], 0)[0] for w in windows]).double(), -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("f32", type=Path)
    ap.add_argument("quant", type=Path)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from v4convert.demo import bundled_model
    from v4convert.verify import DEFAULT_DATA, VerifyOptions, make_windows, verify
    ref = bundled_model("v3")
    opts = VerifyOptions(ctx=a.ctx, tokens=a.tokens)
    win = make_windows(ref, DEFAULT_DATA, opts)
    half = slice(a.ctx // 2, a.ctx - 1)          # logits positions llama-perplexity scores
    r = verify(ref, a.quant, opts=opts)
    v = float(r["_per_token_kld"].view(win.shape[0], -1)[:, a.ctx // 2:].mean())
    rp, lq = ours_logp(ref, win)[:, half], llama_logp(a.quant, win)[:, half]
    print(f"{a.quant.name}: {win.shape[0]} windows x {a.ctx}, logits positions {half.start}..{half.stop - 1}")
    print(f"  verify (top-256 + rest)                      {v:.6f}")
    print(f"  exact: our runtime (FP8) vs llama.cpp quant  {float(kld(rp, lq).mean()):.6f}")
    for f32_kv in (True, False):
        lf, lq2 = llama_logp(a.f32, win, f32_kv)[:, half], llama_logp(a.quant, win, f32_kv)[:, half]
        print(f"  llama-only, {'F32' if f32_kv else 'F16'} KV cache                 {float(kld(lf, lq2).mean()):.6f}"
              f"   (F32 GGUF vs our runtime: {float(kld(rp, lf).mean()):.2e})")

if __name__ == "__main__":
    main()
