"""``v4convert export CKPT --FORMAT --out PATH [options]``: the click command, derived from the export registry.

One flag per registered exporter (``v4convert.export.EXPORTERS``) and one option per field of its ``Options``
dataclass; formats the tool names but does not write yet are accepted and refused with a clear error, so
scripts get a stable interface.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from v4convert.errors import UserError
from v4convert.export import EXPORTERS, Exporter

from .sizes import parse_size

# formats named by the CLI before they exist; an entry is inert once EXPORTERS has the name
PLANNED = {"onnx": "ONNX for onnxruntime (not yet).", "sharded": "Our sharded layout (not yet)."}


class NotImplementedFormat(UserError):
    """An export format the tool names but does not write yet."""


def _choices(f: dataclasses.Field) -> list[str] | None:
    c = f.metadata.get("choices")
    return list(c() if callable(c) else c) if c is not None else None


def _decl(f: dataclasses.Field) -> str:
    flag = f.name.replace("_", "-")
    return f.metadata.get("cli") or (f"--{flag}/--no-{flag}" if isinstance(f.default, bool) else f"--{flag}")


def _option_specs() -> dict[str, list[tuple[Exporter, dataclasses.Field]]]:
    """Field name -> the exporters having a field of that name (one click option each name)."""
    specs: dict[str, list[tuple[Exporter, dataclasses.Field]]] = {}
    for ex in EXPORTERS.values():
        for f in ex.fields():
            specs.setdefault(f.name, []).append((ex, f))
    return specs


def _click_option(name: str, owners: list[tuple[Exporter, dataclasses.Field]]):
    f = owners[0][1]
    helps = [o.metadata["help"] + ("" if isinstance(o.default, bool) or o.default is None
                                   else f"  [default: {o.default}]")
             for _, o in owners]
    text = helps[0] if len(owners) == 1 else "; ".join(f"{e.name.upper()}: {h}" for (e, _), h in zip(owners, helps))
    choices = list(dict.fromkeys(c for _, o in owners for c in (_choices(o) or [])))
    typ = click.Choice(choices, case_sensitive=False) if choices and all(_choices(o) for _, o in owners) else None
    kinds = {type(o.default) for _, o in owners}
    if typ is None and len(kinds) == 1 and kinds <= {int, float}:
        typ = kinds.pop()                     # numbers parse in click; mixed kinds are converted in _build
    if isinstance(f.default, bool):
        return click.option(_decl(f), name, default=None, help=text)
    return click.option(_decl(f), name, default=None, type=typ, help=text)


def _build(src: Path, out: Path, ex: Exporter, given: dict) -> object:
    opts_cls = ex.options()
    names = {f.name: f for f in dataclasses.fields(opts_cls)}
    kw = {}
    for k, v in given.items():
        if v is None:
            continue
        if k not in names:
            raise click.UsageError(f"{_decl(_option_specs()[k][0][1]).split('/')[0]} is not an option of --{ex.name}")
        f = names[k]
        if f.metadata.get("size"):
            v = parse_size(v)
        elif (c := _choices(f)) is not None:
            canon = {x.upper(): x for x in c}
            if str(v).upper() not in canon:
                raise click.BadParameter(f"{v!r} is not one of {', '.join(c)}", param_hint=_decl(f))
            v = canon[str(v).upper()]
        elif type(f.default) in (int, float) and isinstance(v, str):
            try:
                v = type(f.default)(v)
            except ValueError:
                raise click.BadParameter(f"{v!r} is not a number", param_hint=_decl(f)) from None
        kw[k] = v
    return opts_cls(**kw)


def _make_command() -> click.Command:
    specs = _option_specs()

    def export_command(ckpt: Path, fmt: str | None, out: Path | None, progress: bool | None, **given) -> None:
        """Export checkpoint CKPT (as published, or our FP4 artifact) to another runtime's format.

        GGUF: arch deepseek2 (V3/R1/V3.1), deepseek32 (V3.2) or deepseek4 (V4) with llama.cpp's metadata,
        tokenizer and tensor names, streamed tensor by tensor; default mix: experts MXFP4, attention and
        shared experts Q8_0, norms/router F32.
        """
        if fmt is None:
            known = ", ".join(f"--{n}" for n in EXPORTERS)
            raise click.UsageError(f"choose an output format: {known}")
        if fmt not in EXPORTERS:
            raise NotImplementedFormat(f"export --{fmt} is not implemented yet (only "
                                       f"{', '.join('--' + n for n in EXPORTERS)} is)")
        from v4convert import api
        ex = EXPORTERS[fmt]
        opts = _build(ckpt, out, ex, given)
        if out is None:
            if not hasattr(opts, "default_name"):
                raise click.UsageError(f"--{fmt} needs --out")
            out = Path.cwd() / opts.default_name(ckpt)
        r = api.export(api.ExportArgs(src=ckpt, out=out, format=fmt, options=opts,
                                      progress=sys.stderr.isatty() if progress is None else progress,
                                      log=lambda s: click.echo(s, err=True)))
        gbps = r.n_bytes / max(r.seconds, 1e-9) / 1e9
        click.echo(f"wrote {r.label or fmt.upper()}: {r.n_tensors} tensors, {r.n_bytes:,} bytes in {len(r.paths)} "
                   f"file(s) in {r.seconds:.1f} s ({gbps:.2f} GB/s): {', '.join(str(p) for p in r.paths)}")
        for note in r.notes:
            click.echo(f"  {note}")

    cmd = export_command
    for name in reversed(list(specs)):
        cmd = _click_option(name, specs[name])(cmd)
    cmd = click.option("--progress/--no-progress", default=None,
                       help="Progress bar (default: when stderr is a terminal).")(cmd)
    cmd = click.option("--out", default=None, type=click.Path(path_type=Path),
                       help="Output path (GGUF: NAME.gguf) [default for GGUF: ./CKPTNAME-TYPE.gguf].")(cmd)
    for name, help_text in reversed([*((e.name, e.help) for e in EXPORTERS.values()),
                                     *((n, h) for n, h in PLANNED.items() if n not in EXPORTERS)]):
        cmd = click.option(f"--{name}", "fmt", flag_value=name, help=help_text)(cmd)
    cmd = click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))(cmd)
    return click.command("export")(cmd)


export_command = _make_command()
