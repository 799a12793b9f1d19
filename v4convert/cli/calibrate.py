"""``v4convert calibrate CKPT --calib [PATH] (--imatrix OUT.gguf | --stats DIR)``: run the calibration pass once
and save what it measured: llama.cpp's importance matrix (``calib/imatrix.py``), for ``export --gguf --type q4_k_m
--imatrix OUT.gguf`` or llama.cpp's own ``llama-quantize --imatrix``; and/or the per-linear statistics
(``calib/saved.py``) that ``quantize --calib-stats DIR`` reuses for any calibrated recipe."""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("calibrate")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--calib", "calib", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="Calibrate on PATH (.txt, .jsonl with a 'text' field, or a directory of them), tokenized with the "
                   "checkpoint's tokenizer.json; without PATH (or without --calib): the bundled corpus's training "
                   "split.")
@click.option("--calib-tokens", type=int, default=8192, show_default=True,
              help="Calibration tokens (real models: 8192-131072 recommended).")
@click.option("--calib-seq-len", type=int, default=512, show_default=True,
              help="Tokens per calibration window (= the imatrix chunk size).")
@click.option("--imatrix", "imatrix", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write llama.cpp's GGUF importance matrix here (OUT.gguf): per weight in_sum2 / counts, routed "
                   "experts as rows of their ffn_*_exps tensor.")
@click.option("--stats", "stats", default=None, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Save every block linear's statistics (X^T X / n, max|x|, tokens; safetensors) in DIR, for "
                   "`quantize --calib-stats DIR` with any calibrated recipe (one pass, many artifacts).")
@click.option("--overwrite", is_flag=True, help="Replace a previous v4convert imatrix / statistics output.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def calibrate_command(ckpt: Path, calib: str | None, calib_tokens: int, calib_seq_len: int, imatrix: Path | None,
                      stats: Path | None, overwrite: bool, progress: bool | None) -> None:
    """Collect calibration statistics of CKPT and save them (--imatrix OUT.gguf and/or --stats DIR).

    The model runs unquantized, layer by layer, on the calibration windows (the same pass as
    `quantize --calib`); every block linear's inputs give sum(x^2) per input column and a token count.
    """
    from v4convert.calib.data import calibration_windows
    from v4convert.calib.imatrix import calibrate_imatrix

    if imatrix is None and stats is None:
        raise click.UsageError("say what to save: --imatrix OUT.gguf and/or --stats DIR")
    data = calibration_windows(ckpt, Path(calib) if calib else None, calib_tokens, calib_seq_len)
    progress = sys.stderr.isatty() if progress is None else progress
    col = None
    if stats is not None:
        from v4convert.calib.saved import block_linears, save_pass
        from v4convert.calib.collect import collect_stats
        from v4convert import outputs
        outputs.claim(stats, sources=[ckpt], overwrite=overwrite)       # both outputs checked before the pass
        if imatrix is not None:
            outputs.claim(imatrix, sources=[ckpt], overwrite=overwrite)
        col = collect_stats(ckpt, data, block_linears(ckpt), propagate=False, progress=progress)
        s = save_pass(ckpt, data, stats, overwrite=overwrite, collected=col)
        click.echo(f"wrote statistics {s['out']}: {s['linears']} linears, {s['tokens']} tokens from {s['source']} "
                   f"(reuse: v4convert quantize {ckpt} --fp4 --calib-stats {stats} --method ... --out ...)")
    if imatrix is None:
        return
    r = calibrate_imatrix(ckpt, data, imatrix, overwrite=overwrite, progress=progress, collected=col)
    click.echo(f"wrote imatrix {r['out']}: {r['entries']} entries ({r['expert_entries']} stacked expert tensors, "
               f"{r['experts_without_tokens']} expert rows without tokens), {r['chunks']} chunks x "
               f"{r['chunk_size']} tokens from {r['source']}")
    if r["uncovered"]:
        click.echo(f"  note: {len(r['uncovered'])} weights got no tokens and have no entry, e.g. {r['uncovered'][0]}",
                   err=True)
