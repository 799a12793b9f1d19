"""``v4convert run CKPT --prompt TEXT``: generate with the bundled runtime, streaming text, then tokens/s."""
from __future__ import annotations

import sys
from pathlib import Path

import click

DTYPES = ("bfloat16", "float16", "float32")     # names of torch dtypes (torch is imported only when running)


@click.command("run")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="Prompt text (encoded with the checkpoint's tokenizer.json).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--max-seq-len", default=4096, show_default=True, type=int, help="KV cache length (prompt + output).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--packed", is_flag=True, help="Keep FP8/FP4 weights packed as stored (kernels.packed) instead of "
              "dequantizing them at load.")
@click.option("--simulate-quant", is_flag=True, help="DeepSeek's FP8 activation fake-quant on quantized linears.")
@click.option("--dynamic-top-p", type=float, default=None,
              help="Opt-in dynamic expert routing: keep experts until their normalised weights reach this mass.")
@click.option("--k-min", type=int, default=1, show_default=True, help="Dynamic routing: fewest experts per token.")
@click.option("--k-max", type=int, default=None, help="Dynamic routing: most experts per token (default: model top-k).")
def run_command(ckpt: Path, prompt: str, max_new_tokens: int, temperature: float, max_seq_len: int, seed: int,
                device: str, dtype: str, threads: int | None, packed: bool, simulate_quant: bool, dynamic_top_p: float | None, k_min: int,
                k_max: int | None) -> None:
    """Generate text from CKPT (any checkpoint the runtime loads) and report prefill/decode tokens/s."""
    import torch

    from v4convert.checkpoint import Checkpoint
    from v4convert.runtime import DynamicRouting, load
    from v4convert.runtime.generate import GenerationError, TextStreamer, Tokenizer, generate

    if threads is not None:
        if threads < 1:
            raise click.BadParameter(f"must be >= 1, got {threads}", param_hint="--threads")
        torch.set_num_threads(threads)
    tok = Tokenizer.open(ckpt)                       # fails fast, before loading weights
    ids = tok.encode(prompt)
    if len(ids) > max_seq_len:
        raise GenerationError(f"prompt is {len(ids)} tokens, longer than --max-seq-len {max_seq_len}")
    dynamic = None
    if dynamic_top_p is not None:
        if k_max is None:
            with Checkpoint.open(ckpt) as ck:
                k_max = ck.arch.top_k
        dynamic = DynamicRouting(top_p=dynamic_top_p, k_min=k_min, k_max=k_max)
    model = load(ckpt, device=device, dtype=getattr(torch, dtype), max_seq_len=max_seq_len,
                 simulate_quant=simulate_quant, dynamic_routing=dynamic, packed=packed)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    streamer = TextStreamer(tok, write)
    res = generate(model, ids, max_new_tokens, temperature, tok.eos_ids, seed, on_token=streamer)
    streamer.flush()
    click.echo("")
    click.echo(f"prefill: {len(res.prompt_ids)} tokens in {res.prefill_s:.3f} s = {res.prefill_tok_s:.1f} tok/s; "
               f"decode: {len(res.new_ids) - 1} tokens in {res.decode_s:.3f} s = {res.decode_tok_s:.1f} tok/s "
               f"(stop: {res.stop_reason})")
    if dynamic is not None and hasattr(model, "routing_stats"):
        click.echo(f"dynamic routing: {model.routing_stats()['experts_per_token']:.2f} experts/token "
                   f"(top-p {dynamic.top_p}, k {dynamic.k_min}..{dynamic.k_max})")
