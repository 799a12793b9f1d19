"""The CLI's error contract: ``UserError`` -> one ``error: ...`` line, exit 2; anything else is our bug and keeps
its traceback (exit 1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from v4convert.errors import UserError

INJECT = """
import sys
import v4convert.inspect as ins
def boom(path):
    raise {exc}("injected internal failure")
ins.build_report = boom
from v4convert.cli import main
sys.argv = ["v4convert", "inspect", sys.argv[1]]
main()
"""


@pytest.mark.parametrize("exc", ["ValueError", "KeyError"])
def test_internal_error_keeps_traceback(tmp_path: Path, exc: str) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    r = subprocess.run([sys.executable, "-c", INJECT.format(exc=exc), str(cfg)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback (most recent call last)" in r.stderr
    assert f"{exc}: " in r.stderr and "injected internal failure" in r.stderr
    assert not r.stderr.startswith("error:")


def test_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "v4convert.cli", "inspect", str(cfg)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith(f"error: {cfg}: invalid JSON") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def _user_error_classes() -> list[type]:
    from v4convert.artifacts import ArtifactError
    from v4convert.checkpoint import CheckpointError
    from v4convert.cli.export import NotImplementedFormat
    from v4convert.demo import DemoError
    from v4convert.export.gguf.exporter import ExportError
    from v4convert.export.gguf.names import GGUFNameError
    from v4convert.families.layout import LayoutError
    from v4convert.formats.containers import ContainerError
    from v4convert.formats.fp4 import BlockShapeError, CodecInputError, NonFiniteInputError
    from v4convert.formats.gguf_quants import QuantError
    from v4convert.formats.gguf_writer import GGUFWriteError
    from v4convert.formats.safetensors_io import FormatError
    from v4convert.kernels.packed import PackedWeightError
    from v4convert.quant.engine import OutputExistsError
    from v4convert.quant.plan import QuantizeError
    from v4convert.quant.recipes import RecipeError
    from v4convert.quant.unit_io import DiskFullError, SourceReadError
    from v4convert.runtime.args import ConfigError
    from v4convert.runtime.common import RuntimeLoadError
    from v4convert.runtime.deepseek_v3 import SequenceTooLong
    from v4convert.runtime.generate import GenerationError
    from v4convert.synth import SynthError
    from v4convert.verify import VerifyError
    from v4convert.verify.plot import PlotUnavailable
    return [ArtifactError, CheckpointError, NotImplementedFormat, DemoError, ExportError, GGUFNameError, LayoutError,
            ContainerError, BlockShapeError, CodecInputError, NonFiniteInputError, QuantError, GGUFWriteError,
            FormatError, PackedWeightError, OutputExistsError, QuantizeError, RecipeError, DiskFullError,
            SourceReadError, ConfigError, RuntimeLoadError, SequenceTooLong, GenerationError, SynthError,
            PlotUnavailable, VerifyError]


def test_every_user_error_class_derives_from_user_error() -> None:
    bad = [c.__name__ for c in _user_error_classes() if not issubclass(c, UserError)]
    assert bad == []
