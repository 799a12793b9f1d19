"""vLLM as a judge: a worker process that serves one checkpoint with vLLM's in-process engine.

Run by :mod:`v4convert.artifacts.vllm` in a python that has vLLM (its own venv: vLLM pins transformers and
compressed-tensors versions of its own), as a script: it imports nothing of v4convert but the shims beside it.

    python vllm_worker.py MODEL_DIR --dtype float32 --max-model-len 512

Protocol: one JSON object per line on stdin, one JSON reply per line on the original stdout (everything vLLM
prints goes to stderr). The first reply, unasked, is ``{"ready": true, "vllm": VERSION, "platform": ...,
"shims": [...], "vocab_size": V}``; a failure is ``{"error": "...", "kind": "load"|"request"}``.

* ``{"op": "generate", "prompts": [[ids]], "max_tokens": N, "logprobs": K}`` -> greedy (temperature 0)
  ``{"tokens": [[ids]], "logprobs": [[{"id": logp, ...} per step]]}`` (vLLM's raw log-probs, top K).
* ``{"op": "logprobs", "ids": [ids], "out": PATH}`` -> writes float32 ``[T, V]`` log-probs of the next token
  after each position (rows 0..T-2 from ``prompt_logprobs``, row T-1 from one sampled step) to PATH;
  replies ``{"shape": [T, V]}``.
* ``{"op": "load", "model": DIR}`` -> serve another checkpoint (the engine is rebuilt, vLLM stays imported);
  replies like the ready message.
* ``{"op": "tokenize", "texts": [str]}`` -> ``{"ids": [[ids]]}`` with vLLM's tokenizer (special tokens added
  the way vLLM adds them to a text prompt).

Deviations from vLLM's default CPU serving (same math, other kernels; the GEMM shims are in
``vllm_cpu_shims.py``):

* attention: ``attention_backend="CPU_MLA"`` on every CPU. With AMX (``torch.cpu._is_amx_tile_supported()``)
  vLLM 0.32 otherwise picks ``AMX_MLA``, which VNNI-packs the MLA weights at load and takes only bf16/fp16
  (float32: "expect weight to be bfloat16, float16, int8, fp8_e4m3 or uint8"); ``CPU_MLA`` (vLLM's reference
  MLA: SDPA prefill, ``mla_decode_kvcache`` decode) is what vLLM picks without AMX, so both CPUs serve alike.
* FP8 block linears on an AMX CPU in float32: see the ``fp8-block-linear-float32`` shim.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, this folder is sys.path[0]: its vllm.py (our client) would shadow the real vllm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _load_shims():
    spec = importlib.util.spec_from_file_location("v4convert_vllm_cpu_shims", HERE / "vllm_cpu_shims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _logprob_rows(entries, vocab: int):
    import numpy as np

    out = np.full((len(entries), vocab), -np.inf, dtype=np.float32)
    for i, d in enumerate(entries):
        for tok, lp in d.items():
            if tok < vocab:
                out[i, tok] = lp.logprob
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--no-shims", action="store_true", help="do not install the CPU kernel shims")
    args = ap.parse_args()

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                      # vLLM's own prints and logs go to stderr
    sys.stdout = sys.stderr
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")            # GiB of KV cache (default is much more)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # in-process engine: shims apply to it

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        shims: list[str] = []
        if current_platform.is_cpu() and not args.no_shims:
            shims = _load_shims().install()
    except Exception as e:  # noqa: BLE001 -- any failure is reported to the client, which raises it
        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {e}", "kind": "load"})
        return 1

    def load(model: str):
        vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
        # On a CPU with AMX, vLLM picks its AMX MLA backend, which packs the MLA weights for bf16/fp16 only
        # (float32 fails at load). Its reference CPU MLA backend (the default without AMX) serves any dtype.
        extra = {"attention_backend": "CPU_MLA"} if current_platform.is_cpu() else {}
        llm = LLM(model=model, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
                  max_num_seqs=1, seed=0, max_logprobs=vocab, enable_prefix_caching=False, **extra)
        return llm, llm.get_tokenizer(), vocab

    def ready() -> dict:
        return {"ready": True, "vllm": vllm.__version__, "platform": str(current_platform.device_type),
                "shims": shims, "vocab_size": vocab}

    try:
        llm, tok, vocab = load(args.model)
    except Exception as e:  # noqa: BLE001 -- reported to the client as a load failure
        traceback.print_exc()
        reply({"error": f"{type(e).__name__}: {e}", "kind": "load"})
        return 1
    reply(ready())

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "generate":
                sp = SamplingParams(temperature=0.0, max_tokens=int(req["max_tokens"]),
                                    logprobs=int(req.get("logprobs", 0)) or None, ignore_eos=True)
                outs = llm.generate([{"prompt_token_ids": list(p)} for p in req["prompts"]], sp, use_tqdm=False)
                reply({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                       "logprobs": [[{str(t): lp.logprob for t, lp in d.items()} for d in (o.outputs[0].logprobs or [])]
                                    for o in outs]})
            elif op == "logprobs":
                import numpy as np

                ids = list(req["ids"])
                sp = SamplingParams(temperature=0.0, max_tokens=1, logprobs=vocab, prompt_logprobs=vocab,
                                    ignore_eos=True)
                o = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
                rows = (o.prompt_logprobs or [None])[1:] + [o.outputs[0].logprobs[0]]
                arr = _logprob_rows(rows, vocab)
                if arr.shape[0] != len(ids):
                    raise RuntimeError(f"vLLM returned {arr.shape[0]} log-prob rows for {len(ids)} tokens")
                np.ascontiguousarray(arr).tofile(req["out"])
                reply({"shape": list(arr.shape)})
            elif op == "load":
                import gc

                del llm, tok
                gc.collect()
                try:
                    llm, tok, vocab = load(req["model"])
                except Exception as e:  # noqa: BLE001 -- reported to the client as a load failure
                    traceback.print_exc()
                    reply({"error": f"{type(e).__name__}: {e}", "kind": "load"})
                    return 1        # the engine is gone: this worker cannot serve anything now
                reply(ready())
            elif op == "tokenize":
                reply({"ids": [list(tok.encode(t)) for t in req["texts"]]})
            else:
                reply({"error": f"unknown op {op!r}", "kind": "request"})
        except Exception as e:  # noqa: BLE001 -- reported to the client; the worker serves the next request
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}", "kind": "request"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
