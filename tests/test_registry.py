"""The export and artifact registries: a new exporter / runner is its module + one registry row."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from click.testing import CliRunner

from v4convert import artifacts
from v4convert import export as registry
from v4convert.cli import export as cli_export


def _fake_exporter_module(calls: list) -> types.ModuleType:
    mod = types.ModuleType("v4c_fake_exporter")

    @dataclass
    class Options:
        level: int = field(default=1, metadata={"help": "How hard to try."})
        fast: bool = field(default=False, metadata={"help": "Go fast."})
        flavour: str = field(default="plain", metadata={"help": "Which.", "choices": ["plain", "spicy"]})

    def export(src: Path, out: Path, opts: Options, *, progress: bool = False) -> registry.ExportResult:
        calls.append((src, out, opts, progress))
        out.write_bytes(b"x" * 7)
        return registry.ExportResult([out], 3, 7, 0.5, ["a note"])

    mod.Options, mod.export = Options, export
    return mod


def test_new_exporter_is_one_registry_line(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "v4c_fake_exporter", _fake_exporter_module(calls))
    monkeypatch.setitem(registry.EXPORTERS, "fake", registry.Exporter("fake", "v4c_fake_exporter", "A fake format."))
    cmd = cli_export._make_command()
    src = tmp_path / "ckpt"
    src.mkdir()
    runner = CliRunner()
    h = runner.invoke(cmd, ["--help"])
    assert h.exit_code == 0 and "--fake" in h.output and "A fake format." in h.output
    assert "--level" in h.output and "--fast / --no-fast" in h.output and "--gguf" in h.output
    r = runner.invoke(cmd, [str(src), "--fake", "--out", str(tmp_path / "o.bin"), "--level", "3", "--fast",
                            "--flavour", "SPICY", "--no-progress"])
    assert r.exit_code == 0, r.output
    (s, o, opts, progress), = calls
    assert (s, o, progress) == (src, tmp_path / "o.bin", False)
    assert (opts.level, opts.fast, opts.flavour) == (3, True, "spicy")
    assert r.output.splitlines() == ["wrote FAKE: 3 tensors, 7 bytes in 1 file(s) in 0.5 s (0.00 GB/s): "
                                     f"{tmp_path / 'o.bin'}", "  a note"]
    # defaults when not given; another exporter's option is refused for this one
    calls.clear()
    assert runner.invoke(cmd, [str(src), "--fake", "--out", str(tmp_path / "p.bin")]).exit_code == 0
    assert (calls[0][2].level, calls[0][2].fast, calls[0][2].flavour) == (1, False, "plain")
    bad = runner.invoke(cmd, [str(src), "--fake", "--out", str(tmp_path / "q.bin"), "--type", "Q8_0"])
    assert bad.exit_code == 2 and "--type is not an option of --fake" in bad.output
    bad = runner.invoke(cmd, [str(src), "--fake", "--out", str(tmp_path / "q.bin"), "--flavour", "sour"])
    assert bad.exit_code == 2 and "sour" in bad.output


def test_gguf_options_keep_the_old_flags() -> None:
    from v4convert.export.gguf import Options
    cmd = cli_export.export_command
    flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    assert {"--gguf", "--out", "--type", "--expert-type", "--mtp", "--no-mtp", "--split-max-size", "--no-modelfile",
            "--progress", "--no-progress"} <= flags
    o = Options()
    assert (o.main_type, o.expert_type, o.keep_mtp, o.split_max_size, o.modelfile) == ("Q8_0", "MXFP4", True, None,
                                                                                       True)


class _FakeRunner:
    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 512) -> None:
        self.path, self.kind, self.vocab_size = path, artifacts.ArtifactKind.ONNX, 5


def test_new_runner_is_one_row(tmp_path, monkeypatch) -> None:
    mod = types.ModuleType("v4c_fake_runner")
    mod.FakeRunner = _FakeRunner
    monkeypatch.setitem(sys.modules, "v4c_fake_runner", mod)
    p = tmp_path / "m.onnx"
    p.write_bytes(b"")
    assert artifacts.detect_kind(p) is artifacts.ArtifactKind.ONNX
    row = artifacts.KindRow(artifacts.ArtifactKind.ONNX, lambda q: q.suffix == ".onnx", "v4c_fake_runner:FakeRunner")
    monkeypatch.setitem(artifacts.ROWS, artifacts.ArtifactKind.ONNX, row)
    r = artifacts.open_runner(p)
    assert isinstance(r, _FakeRunner) and r.path == p
