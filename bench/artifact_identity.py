"""Writes every artifact of every tiny preset and prints one sha256 per file.

The proof that a refactor kept artifact bytes: run it on two commits and diff the outputs, e.g.

    python bench/artifact_identity.py > after.txt
    git worktree add /tmp/before da2ad86 && (cd /tmp/before && pip install -e . --no-deps) \
        && python bench/artifact_identity.py > before.txt
    diff before.txt after.txt && echo identical

Only the public CLI entry point (``v4convert.cli.main``) is used, in process, so the script runs unchanged
on any layout of the package. Sources: the synth tiny presets and the bundled trained tiny-v3 / tiny-v4.
Per source: ``quantize --fp4`` for every recipe x container (refusals are printed as one ``refused`` line
with the error text, so a changed refusal shows too), the NVFP4 scale methods and the MXFP4 exponent rules,
``export --gguf`` with the default mix and all-F32, and ``export --gguf`` of the MXFP4 artifact (re-pack).
``inspect --json`` output is hashed too. Every path is printed relative to the work directory.
Takes a few minutes on two cores.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import sys
import tempfile
from importlib import resources
from pathlib import Path

SYNTH = ["v3-tiny", "v32-tiny", "v4-flash-tiny", "v4-flash-base-tiny"]
BUNDLED = ["tiny-v3", "tiny-v4"]
RECIPES = ["nvfp4-experts", "nvfp4-all-linear", "mxfp4-experts"]
CONTAINERS = ["compressed-tensors", "modelopt", "deepseek"]
# extra quantize variants (on every source): (name, argv tail)
VARIANTS = [("mse", ["--scale-method", "mse"]), ("four-over-six", ["--scale-method", "four-over-six"]),
            ("all-linear-mse", ["--recipe", "nvfp4-all-linear", "--scale-method", "mse"]),
            ("mx-round-up", ["--recipe", "mxfp4-experts", "--mx-rule", "round-up"]),
            ("keep-native", ["--keep-native-fp4"])]
GGUF = [("gguf-default", []), ("gguf-f32", ["--type", "F32", "--expert-type", "F32"])]


def cli(*args: str) -> tuple[int, str]:
    """Runs ``v4convert ARGS`` in this process; returns (exit code, stdout + stderr)."""
    from v4convert.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main.main(list(args), prog_name="v4convert", standalone_mode=False)
            rc = 0
        except SystemExit as e:
            rc = int(e.code or 0)
        except Exception as e:          # noqa: BLE001 - a refusal is a result to print, whatever its class
            buf.write(f"{type(e).__name__}: {e}\n")
            rc = 2
    return rc, buf.getvalue()


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def emit(root: Path, out: Path) -> None:
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    for p in files:
        print(f"{sha(p)}  {p.relative_to(root)}", flush=True)


def run(root: Path, label: str, *args: str) -> None:
    rc, text = cli(*args)
    if rc != 0:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        print(f"refused rc={rc}  {label}: {last.replace(str(root) + '/', '')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated sources to run (default: all)")
    a = ap.parse_args()
    import torch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = (a.work or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        data = Path(str(resources.files("v4convert").joinpath("data")))
        sources: list[tuple[str, Path]] = []
        for p in SYNTH:
            src = root / p
            run(root, f"synth {p}", "synth", "--preset", p, "--out", str(src))
            sources.append((p, src))
        sources += [(b, data / b) for b in BUNDLED]
        only = set(a.only.split(",")) if a.only else None
        for name, src in sources:
            if only and name not in only:
                continue
            if name in SYNTH:
                emit(root, src)
            rc, text = cli("inspect", str(src), "--json")
            print(f"{hashlib.sha256(text.replace(str(src), 'SRC').encode()).hexdigest()}  inspect {name} rc={rc}")
            quants: list[tuple[str, list[str]]] = [(f"{r}.{c}", ["--recipe", r, "--format", c])
                                                   for r in RECIPES for c in CONTAINERS]
            quants += VARIANTS
            for qname, tail in quants:
                out = root / "q" / name / qname
                run(root, f"quantize {name} {qname}", "quantize", str(src), "--fp4", "--out", str(out),
                    "--workers", "1", *tail)
                if out.exists():
                    emit(root, out)
            gsrcs = [("src", src), ("mxfp4", root / "q" / name / "mxfp4-experts.compressed-tensors")]
            for sname, gsrc in gsrcs:
                if not gsrc.exists():
                    continue
                for gname, tail in GGUF:
                    out = root / "gguf" / name / f"{sname}.{gname}.gguf"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    run(root, f"export {name} {sname} {gname}", "export", str(gsrc), "--gguf", "--out", str(out),
                        "--no-progress", *tail)
                    for p in sorted(out.parent.glob(f"{sname}.{gname}*")):
                        emit(root, p)
                    mf = out.parent / "Modelfile"
                    if mf.exists():
                        emit(root, mf)
                        mf.unlink()


if __name__ == "__main__":
    sys.exit(main())
