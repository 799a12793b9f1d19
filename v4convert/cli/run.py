"""``v4convert run CKPT --prompt TEXT``: generate with the bundled runtime, streaming text, then tokens/s."""
from __future__ import annotations

import sys
from pathlib import Path

import click

DEFAULT_MAX_SEQ = 4096                          # KV cache length when the model allows it
DTYPES = ("bfloat16", "float16", "float32")     # names of torch dtypes (torch is imported only when running)


@click.command("run")
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.option("--prompt", required=True, help="Prompt text (encoded with the checkpoint's tokenizer.json).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--max-seq-len", default=None, type=int, help="KV cache length (prompt + output) [default: the "
              "model's max_position_embeddings, at most 4096]; never beyond the model's limit.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: the cores not busy with other processes; see v4convert/threads.py).")
@click.option("--packed", is_flag=True, help="Keep FP8/FP4 weights packed as stored (kernels.packed) instead of "
              "dequantizing them at load.")
@click.option("--simulate-quant", is_flag=True, help="DeepSeek's FP8 activation fake-quant on quantized linears.")
@click.option("--no-act-quant", "no_act_quant", is_flag=True,
              help="W4A4 artifact: run without the FP4 activation fake-quant its config declares (on by default).")
@click.option("--dynamic-top-p", type=float, default=None,
              help="Opt-in dynamic expert routing: keep experts until their normalised weights reach this mass.")
@click.option("--k-min", type=int, default=1, show_default=True, help="Dynamic routing: fewest experts per token.")
@click.option("--k-max", type=int, default=None, help="Dynamic routing: most experts per token (default: model top-k).")
@click.option("--tp", type=int, default=None, help="Tensor-parallel ranks when CKPT is an unsharded checkpoint (each "
              "rank reads only its slices); run under torchrun. A sharded layout brings its own.")
@click.option("--ep", type=int, default=None, help="Expert-parallel groups (see --tp); world size = max(tp, ep).")
def run_command(ckpt: Path, prompt: str, max_new_tokens: int, temperature: float, max_seq_len: int | None, seed: int,
                device: str, dtype: str, threads: int | None, packed: bool, simulate_quant: bool, no_act_quant: bool, dynamic_top_p: float | None, k_min: int,
                k_max: int | None, tp: int | None, ep: int | None) -> None:
    """Generate text from CKPT (any checkpoint the runtime loads, or an ONNX export directory, run through
    onnxruntime) and report prefill/decode tokens/s.

    Distributed: `torchrun --nproc-per-node N -m v4convert run DIR ...` on a sharded layout (export --sharded)
    or on any checkpoint with --tp/--ep; every rank loads its part, rank 0 prints.
    """
    import torch

    from v4convert.checkpoint import Checkpoint
    from v4convert.runtime import DynamicRouting, load
    from v4convert.runtime.generate import GenerationError, TextStreamer, Tokenizer, generate

    if threads is not None:
        if threads < 1:
            raise click.BadParameter(f"must be >= 1, got {threads}", param_hint="--threads")
    if not ckpt.is_dir():
        hint = (f"; run a GGUF in llama.cpp (llama-cli -m {ckpt}) or compare it: v4convert verify CKPT {ckpt}"
                if ckpt.suffix == ".gguf" else "")
        raise GenerationError(f"{ckpt}: run takes a checkpoint directory (config.json + safetensors), "
                              f"not a file{hint}")
    from v4convert.verify import check_ctx, context_limit
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ, context_limit(ckpt) or DEFAULT_MAX_SEQ)
    check_ctx(ckpt, max_seq_len, "--max-seq-len")
    from v4convert.threads import set_torch_threads
    set_torch_threads(threads)
    from v4convert.devices import check_device
    check_device(device)
    tok = Tokenizer.open(ckpt)                       # fails fast, before loading weights
    ids = tok.encode(prompt)
    if len(ids) > max_seq_len:
        raise GenerationError(f"prompt is {len(ids)} tokens, longer than --max-seq-len {max_seq_len}")
    onnx = (ckpt / "model.onnx").is_file()           # an ONNX export: generate through onnxruntime
    if onnx and (tp or ep or packed or simulate_quant or dynamic_top_p is not None):
        raise click.UsageError("--tp/--ep/--packed/--simulate-quant/--dynamic-top-p are runtime options; "
                               f"{ckpt} is an ONNX export (run through onnxruntime)")
    dynamic = None
    if dynamic_top_p is not None:
        if k_max is None:
            from v4convert.families.layout import Arch
            from v4convert.sharded_layout import Manifest, is_sharded_layout
            if is_sharded_layout(ckpt):
                k_max = Arch.from_config(Manifest.read(ckpt).config).top_k
            else:
                with Checkpoint.open(ckpt) as ck:
                    k_max = ck.arch.top_k
        dynamic = DynamicRouting(top_p=dynamic_top_p, k_min=k_min, k_max=k_max)
    if onnx:
        from v4convert.artifacts.onnx import OnnxLM
        model = OnnxLM(ckpt, max_seq_len, device=device, dtype=getattr(torch, dtype))
    else:
        model = load(ckpt, device=device, dtype=getattr(torch, dtype), max_seq_len=max_seq_len,
                     simulate_quant=simulate_quant, dynamic_routing=dynamic, packed=packed, tp=tp, ep=ep,
                     act_quant=not no_act_quant)
    lead = getattr(model, "rank", 0) == 0            # distributed: every rank runs, rank 0 prints

    def write(s: str) -> None:
        if lead:
            sys.stdout.write(s)
            sys.stdout.flush()

    streamer = TextStreamer(tok, write)
    res = generate(model, ids, max_new_tokens, temperature, tok.eos_ids, seed, on_token=streamer)
    streamer.flush()
    if not lead:
        return
    click.echo("")
    click.echo(f"prefill: {len(res.prompt_ids)} tokens in {res.prefill_s:.3f} s = {res.prefill_tok_s:.1f} tok/s; "
               f"decode: {len(res.new_ids) - 1} tokens in {res.decode_s:.3f} s = {res.decode_tok_s:.1f} tok/s "
               f"(stop: {res.stop_reason})")
    if dynamic is not None and hasattr(model, "routing_stats"):
        click.echo(f"dynamic routing: {model.routing_stats()['experts_per_token']:.2f} experts/token "
                   f"(top-p {dynamic.top_p}, k {dynamic.k_min}..{dynamic.k_max})")
