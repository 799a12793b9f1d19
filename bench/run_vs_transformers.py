"""Decode tokens/s of ``v4convert.runtime`` vs transformers' ``generate`` on the same tiny model, same run.

    python bench/run_vs_transformers.py [--family v3|v32] [--new-tokens 64] [--prompt-len 32] [--threads 1] [--repeats 3]

Builds a tiny random DeepseekV3ForCausalLM / DeepseekV32ForCausalLM (float32), saves it, loads it with
``v4convert.runtime.load``, then times greedy generation of the same prompt with both (after one warm-up
each; best of ``--repeats`` interleaved runs, as the CPU may be shared) and prints prefill / decode tokens/s and
the ratio. Both produce the same greedy tokens (checked).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def tiny(family: str):
    import transformers
    kw = dict(vocab_size=1003, hidden_size=256, intermediate_size=512, moe_intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=32,
              num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=96, q_lora_rank=128, qk_rope_head_dim=16,
              v_head_dim=32, qk_nope_head_dim=32, first_k_dense_replace=1, max_position_embeddings=4096,
              num_nextn_predict_layers=0, rope_theta=10000.0,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                            "mscale": 1.0, "mscale_all_dim": 1.0})
    if family == "v32":
        kw.update(index_n_heads=16, index_head_dim=64, index_topk=32)
        return transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**kw))
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["v3", "v32"], default="v3")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from v4convert.runtime import load
    from v4convert.runtime.generate import generate

    hf = tiny(args.family).float().eval()
    with torch.no_grad():     # larger weights than the 0.02 init so routing/attention are not uniform
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    prompt = torch.randint(3, 1000, (1, args.prompt_len))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load(d, max_seq_len=args.prompt_len + args.new_tokens + 1)
    ids = prompt[0].tolist()
    n = args.new_tokens

    generate(ours, ids, 4)                                   # warm-up
    with torch.no_grad():
        hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)   # warm-up
    best = None
    hf_prefill = hf_total = float("inf")
    for _ in range(args.repeats):                            # interleaved, best of each
        r = generate(ours, ids, n)
        best = r if best is None or r.decode_s < best.decode_s else best
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            t2 = time.perf_counter()
        hf_prefill, hf_total = min(hf_prefill, t1 - t0), min(hf_total, t2 - t1)
    res = best
    hf_new = out[0, args.prompt_len:].tolist()
    hf_decode = hf_total - hf_prefill                       # n tokens = prefill + (n-1) decode steps
    hf_tok_s = (n - 1) / hf_decode
    same = hf_new == res.new_ids
    print(f"model: tiny {args.family} float32, {sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M params, "
          f"prompt {args.prompt_len}, new {n}, threads {args.threads}")
    print(f"ours         prefill {res.prefill_tok_s:8.1f} tok/s  decode {res.decode_tok_s:7.1f} tok/s")
    print(f"transformers prefill {args.prompt_len / hf_prefill:8.1f} tok/s  decode {hf_tok_s:7.1f} tok/s")
    print(f"decode ratio ours/transformers: {res.decode_tok_s / hf_tok_s:.2f}x; greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
