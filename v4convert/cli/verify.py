"""``v4convert verify REF ARTIFACT``: the click command (logic in ``v4convert.verify``).

Exit codes: 0 all thresholds met (or none given), 1 a threshold crossed, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import torch

from ..artifacts import ArtifactKind

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@click.command("verify")
@click.argument("ref", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text to score (default: the bundled held-out Python stdlib text).")
@click.option("--tokens", type=int, default=None, help="Tokens to score, in whole windows [default: 4096].")
@click.option("--ctx", type=int, default=None, help="Window length in tokens [default: the training context of our trained fixtures, else 512; "
              "never beyond the model's max_position_embeddings].")
@click.option("--top-k", "top_k", type=int, default=None,
              help="Reference tokens kept per position; KL is exact when >= vocab [default: 256].")
@click.option("--gen-tokens", type=int, default=None, help="Greedy continuation length per prompt [default: 32].")
@click.option("--gen-prompts", type=int, default=None, help="Greedy prompts (window starts) [default: 4].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: per-layer hidden-state error and the KLD distribution (needs the 'plot' extra).")
@click.option("--max-kld", type=float, default=None, help="Fail (exit 1) when the mean KLD exceeds this.")
@click.option("--min-top1", type=float, default=None, help="Fail (exit 1) when top-1 agreement is below this (0..1).")
@click.option("--max-ppl-ratio", type=float, default=None, help="Fail (exit 1) when PPL(art)/PPL(ref) exceeds this.")
@click.option("--save-ref-logits", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Store the reference pass (top-k log-probs + rest mass, greedy tokens, hidden states); "
                   "an interrupted pass resumes from FILE.parts/.")
@click.option("--ref-logits", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use a stored reference pass instead of running REF (REF is then only checked against it).")
@click.option("--kind", type=click.Choice([k.value for k in ArtifactKind]), default=None,
              help="Artifact runner (default: from the path).")
@click.option("--dynamic-top-p", type=float, default=None,
              help="Run the artifact (our runtime) with dynamic expert routing at this top-p and report routed "
                   "experts per token; ARTIFACT may be REF itself to measure routing alone.")
@click.option("--k-min", type=int, default=1, show_default=True, help="Dynamic routing: fewest experts per token.")
@click.option("--k-max", type=int, default=None, help="Dynamic routing: most experts per token (default: model top-k).")
@click.option("--engine", type=click.Choice(["vllm"]), default=None,
              help="Score ARTIFACT as this serving engine runs it (vllm: vLLM in its own python, see "
                   "V4C_VLLM_PYTHON; same as --kind vllm).")
@click.option("--no-act-quant", "no_act_quant", is_flag=True,
              help="Run the artifact weights-only even where its config declares 4-bit input activations (W4A4); "
                   "default: as a serving engine would, with them (our runtime only).")
@click.option("--device", default="cpu", show_default=True, help="torch device for both models.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="Compute dtype of the artifact (the reference always runs in float32).")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: the cores not busy with other processes; see v4convert/threads.py).")
def verify_command(ref: Path, artifact: Path, data: Path | None, tokens: int | None, ctx: int | None,
                   top_k: int | None, gen_tokens: int | None, gen_prompts: int | None, json_out: Path | None,
                   plot_out: Path | None, max_kld: float | None, min_top1: float | None,
                   max_ppl_ratio: float | None, save_ref_logits: Path | None, ref_logits: Path | None,
                   kind: str | None, engine: str | None, dynamic_top_p: float | None, k_min: int,
                   k_max: int | None, no_act_quant: bool, device: str, dtype: str, threads: int | None) -> None:
    """Accuracy and speed of ARTIFACT against the reference checkpoint REF.

    Both run on the same token windows: KL divergence per token (mean, median, p99, max), top-1 agreement,
    perplexity of each and their ratio, delta-p of the correct token, per-layer hidden-state error, greedy
    generation agreement, prefill/decode tokens per second. Exits 1 when a --max-*/--min-* threshold is crossed.
    """
    from .. import api
    from ..verify import Thresholds, VerifyError, VerifyOptions, cached_options, format_report, json_report
    from ..verify.plot import plot_report, require_matplotlib

    from ..threads import set_torch_threads
    set_torch_threads(threads)
    from ..devices import check_device
    check_device(device)
    if engine is not None:
        if kind is not None and kind != engine:
            raise VerifyError(f"--engine {engine} and --kind {kind} exclude each other")
        kind = engine
    if save_ref_logits and ref_logits:
        raise VerifyError("--save-ref-logits and --ref-logits exclude each other")
    if plot_out is not None:
        require_matplotlib()           # fail before the long passes, not after
    given = {k: v for k, v in dict(ctx=ctx, tokens=tokens, top_k=top_k, gen_tokens=gen_tokens,
                                   gen_prompts=gen_prompts).items() if v is not None}
    if ref_logits is not None:
        opts = dataclasses.replace(cached_options(ref_logits), **given) if given else None
    else:
        from ..verify import default_ctx
        opts = VerifyOptions(**{"ctx": default_ctx(ref), **given})
    show = sys.stderr.isatty()

    def progress(what: str, i: int, n: int) -> None:
        if show:
            click.echo(f"\r{what}: window {i}/{n}", err=True, nl=(i == n))

    dynamic = None
    if dynamic_top_p is not None:
        from v4convert.runtime import DynamicRouting
        if k_max is None:
            cfgp = artifact / "config.json"
            k_max = int(json.loads(cfgp.read_text())["num_experts_per_tok"]) if cfgp.is_file() else 8
        dynamic = DynamicRouting(top_p=dynamic_top_p, k_min=k_min, k_max=k_max)
    r = api.verify(api.VerifyArgs(
        ref, artifact, opts=opts, data=data, dynamic_routing=dynamic,
        thresholds=Thresholds(max_kld=max_kld, min_top1=min_top1, max_ppl_ratio=max_ppl_ratio),
        save_ref=save_ref_logits, ref_cache=ref_logits, kind=ArtifactKind(kind) if kind else None,
        device=device, dtype=DTYPES[dtype], progress=progress, act_quant=not no_act_quant))
    import torch.distributed as dist      # under torchrun every rank verifies its part; rank 0 reports
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        sys.exit(1 if r["thresholds"]["failures"] else 0)
    click.echo(format_report(r))
    if json_out is not None:
        json_out.write_text(json.dumps(json_report(r), indent=2))
        click.echo(f"json: {json_out}")
    if plot_out is not None:
        plot_report(r, plot_out)
        click.echo(f"plot: {plot_out}")
    if r["thresholds"]["failures"]:
        sys.exit(1)
