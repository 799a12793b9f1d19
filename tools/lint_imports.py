"""Checks the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

The ``v4convert`` package is assembled from four source folders (package-dir mapping in setup.py), which
import-linter's graph builder cannot follow: it walks one folder per package. So this copies the ``.py`` files
into the installed shape in a temporary directory, puts it first on the import path, and runs ``lint-imports``.
Usage: ``python tools/lint_imports.py`` (exit status: lint-imports').
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"v4convert": "v4convert", "v4convert/runtime": "runtime", "v4convert/kernels": "kernels",
         "v4convert/formats": "formats"}                # installed path -> source folder (as setup.py)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for dest, src in ROOTS.items():
            for f in (ROOT / src).rglob("*.py"):
                if ".venv" in f.parts:
                    continue
                out = Path(tmp) / dest / f.relative_to(ROOT / src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]))
        code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
        return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml"),
                               "--no-cache"], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
