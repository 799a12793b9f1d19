"""mlx-lm worker: runs in a Python that has ``mlx`` and ``mlx-lm`` (often not ours), driven by
:class:`v4convert.artifacts.mlx.MLXRunner` over stdin/stdout, one JSON object per line each way.

It imports nothing of v4convert (it is run by path). Arrays travel as ``.npy`` files in a directory the
caller owns. Requests (``op``):

* ``load`` ``{path}`` -> ``{vocab_size, model_type, mlx, mlx_lm, n_params}``: ``mlx_lm.load(path)`` (the
  consumer's own loader: ``config.json`` ``quantization`` block, ``sanitize``, strict weight check, tokenizer).
* ``forward`` ``{ids, start_pos, out}`` -> ``{shape}``: logits float32 ``[T, V]`` saved to ``out``; a KV
  cache from ``mlx_lm.models.cache.make_prompt_cache`` (new at ``start_pos == 0``, trimmed back otherwise).
* ``generate`` ``{prompt_ids, max_tokens}`` -> ``{ids}``: greedy ``mlx_lm.generate.generate_step`` tokens.
* ``generate_text`` ``{prompt, max_tokens}`` -> ``{text, prompt_ids}``: ``mlx_lm.generate`` (greedy) on text.
* ``quantize`` ``{w, mode, bits, group_size, dtype, out}`` -> ``mx.quantize`` of the float32 ``.npy``
  ``w`` cast to ``dtype``; saves ``{out}.weight.npy`` (uint8 bytes), ``.scales.npy`` and ``.biases.npy``
  (float32, or uint8 for mx modes).
* ``dequantize`` ``{weight, scales, biases?, mode, bits, group_size, dtype, out}`` -> float32 ``.npy``.
"""
import json
import sys
import traceback

import mlx.core as mx
import numpy as np

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class Worker:
    def __init__(self):
        self.model = None
        self.cache = None

    def load(self, path):
        import mlx_lm
        from mlx.utils import tree_flatten
        self.model, self.tokenizer, config = mlx_lm.load(path, return_config=True)
        self.cache = None
        vocab = int(config.get("vocab_size") or self.model.args.vocab_size)
        n_params = sum(v.size for _, v in tree_flatten(self.model.parameters()))
        return {"vocab_size": vocab, "model_type": config.get("model_type"), "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__, "n_params": int(n_params)}

    def _cache_at(self, start_pos):
        from mlx_lm.models.cache import (
            can_trim_prompt_cache,
            make_prompt_cache,
            trim_prompt_cache,
        )
        if start_pos == 0 or self.cache is None:
            if start_pos != 0:
                raise ValueError(f"start_pos {start_pos} with no cached sequence")
            self.cache = make_prompt_cache(self.model)
            return
        offset = self._offset()
        if start_pos > offset:
            raise ValueError(f"start_pos {start_pos} past the {offset} cached tokens")
        if start_pos < offset:
            if not can_trim_prompt_cache(self.cache):
                raise ValueError("this model's mlx-lm cache cannot be trimmed back")
            trim_prompt_cache(self.cache, offset - start_pos)

    def _offset(self):
        c = self.cache[0]
        while not hasattr(c, "offset") and hasattr(c, "caches"):
            c = c.caches[0]
        return int(c.offset)

    def forward(self, ids, start_pos, out):
        self._cache_at(int(start_pos))
        logits = self.model(mx.array([ids], dtype=mx.int32), cache=self.cache)
        arr = np.array(logits[0].astype(mx.float32))
        np.save(out, arr)
        return {"shape": list(arr.shape)}

    def generate(self, prompt_ids, max_tokens):
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler
        toks = []
        for tok, _ in generate_step(mx.array(prompt_ids, dtype=mx.int32), self.model, max_tokens=max_tokens,
                                    sampler=make_sampler(temp=0.0)):
            toks.append(int(tok))
        self.cache = None
        return {"ids": toks}

    def generate_text(self, prompt, max_tokens):
        import mlx_lm
        from mlx_lm.sample_utils import make_sampler
        text = mlx_lm.generate(self.model, self.tokenizer, prompt=prompt, max_tokens=max_tokens,
                               sampler=make_sampler(temp=0.0))
        self.cache = None
        return {"text": text, "prompt_ids": [int(i) for i in self.tokenizer.encode(prompt)]}

    def quantize(self, w, mode, bits, group_size, dtype, out):
        x = mx.array(np.load(w)).astype(DTYPES[dtype])
        parts = mx.quantize(x, group_size, bits, mode=mode)
        np.save(out + ".weight.npy", np.array(parts[0]).view(np.uint8))
        s = parts[1]
        np.save(out + ".scales.npy", np.array(s) if s.dtype == mx.uint8 else np.array(s.astype(mx.float32)))
        if len(parts) > 2 and parts[2] is not None:
            np.save(out + ".biases.npy", np.array(parts[2].astype(mx.float32)))
        return {}

    def dequantize(self, weight, scales, mode, bits, group_size, dtype, out, biases=None):
        w = mx.array(np.load(weight).view(np.uint32))
        s = np.load(scales)
        s = mx.array(s) if s.dtype == np.uint8 else mx.array(s).astype(DTYPES[dtype])
        b = None if biases is None else mx.array(np.load(biases)).astype(DTYPES[dtype])
        y = mx.dequantize(w, s, b, group_size, bits, mode=mode, dtype=mx.float32)
        np.save(out, np.array(y))
        return {}


def main():
    replies = sys.stdout
    sys.stdout = sys.stderr          # anything mlx / mlx-lm / transformers print must not corrupt the replies
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.pop("op")
        try:
            res = {"ok": True, **getattr(worker, op)(**req)}
        except Exception as e:  # noqa: BLE001 - any mlx error goes back to the caller, which raises it
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(res) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
