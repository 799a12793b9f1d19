"""What a newcomer hits in the first hour (issue #19, #20 items 4-6): Ctrl-C, llama.cpp's log callback,
thread defaults, small CLI frictions. Each test runs the real CLI in a subprocess where the behaviour
is about what the user sees (exit code, stderr)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_gguf_export import synth_config
from v4convert.synth import preset_config

INTERRUPTED = "interrupted — rerun the same command to resume"
N_UNITS = 400              # fewer than the wide_v3 fixture's quantize units


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "v4convert.cli", *args], capture_output=True, text=True, check=False,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def wide_v3(tmp_path_factory) -> Path:
    """A V3 checkpoint with 64 experts per layer: more than ``N_UNITS`` quantize units, so a run lasts
    long enough (one fsync per unit with --sync-every 1B) to be interrupted in the middle."""
    cfg = preset_config("v3-tiny")
    cfg.update(n_routed_experts=64, hidden_size=256, moe_intermediate_size=256, intermediate_size=256)
    return synth_config(cfg, tmp_path_factory.mktemp("wide") / "v3")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_ctrl_c_during_quantize_is_one_line_exit_130_and_resumes(wide_v3: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group (what a terminal's Ctrl-C does, so the workers get it too) in
    the middle of a 2-worker run: exit 130, one line, no traceback; the same command then resumes the
    journaled units and writes files byte-identical to an uninterrupted run."""
    clean = tmp_path / "clean"
    args = ["quantize", str(wide_v3), "--fp4", "--workers", "2", "--sync-every", "1B"]
    r = cli(*args, "--out", str(clean))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "v4convert.cli", *args, "--out", str(out)], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         # a terminal's default; a test run started in the background inherits SIGINT ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    done = out.with_name("out.partial") / ".journal" / "done"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if done.is_file() and len(done.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGSTOP)             # freeze the group: the state checked below cannot move on
    try:
        assert p.poll() is None and not out.exists(), "the run finished before it could be interrupted"
        n = len({line.split()[0] for line in done.read_text().splitlines()})
        assert 3 <= n < N_UNITS, n                 # in the middle: some units journaled, most to do
        os.killpg(p.pid, signal.SIGINT)
    finally:
        os.killpg(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err, err
    assert err.strip().splitlines()[-1] == INTERRUPTED, err
    assert not out.exists() and out.with_name("out.partial").is_dir()
    journaled = len({line.split()[0] for line in done.read_text().splitlines()})
    r = cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"resuming: {journaled} of" in r.stderr, r.stderr
    import re
    assert int(re.search(r"resuming: \d+ of (\d+) units", r.stderr).group(1)) > N_UNITS
    assert _files(out) == _files(clean)


def test_llama_cpp_log_callback_no_traceback_on_successful_k_quant(tmp_path: Path) -> None:
    """export --type q4_k_m runs llama.cpp's quantizer, whose log cuts UTF-8 characters in two (the
    tokenizer dump): llama-cpp-python's callback raised UnicodeDecodeError there. Ours replaces the
    broken bytes and keeps only llama.cpp's warnings/errors."""
    pytest.importorskip("llama_cpp")
    ck = synth_config(preset_config("v3-tiny"), tmp_path / "v3")
    r = cli("export", str(ck), "--gguf", "--out", str(tmp_path / "k.gguf"), "--type", "q4_k_m")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "UnicodeDecodeError" not in r.stderr, r.stderr
    assert "llama_model_loader: - kv" not in r.stderr          # INFO dump dropped
    assert (tmp_path / "k.gguf").stat().st_size > 0


def test_log_callback_replaces_cut_utf8(capfd) -> None:
    pytest.importorskip("llama_cpp")
    from v4convert.export.gguf import llama_log
    llama_log.install()
    cb = llama_log._state["callback"]
    cb(llama_log.LEVEL_ERROR, "token Ġ".encode()[:-1], None)     # "Ġ" cut after its first byte
    cb(llama_log.LEVEL_CONT, b" tail\n", None)
    err = capfd.readouterr().err
    assert err == "token \ufffd tail\n", repr(err)


# ------------------------------------------------------------------------------------ GGUF type mix + constraints
def _gguf_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_type_alone_means_whole_file_and_mix_is_printed_first(tmp_path: Path) -> None:
    """--type F32 alone: every tensor F32 (llama.cpp's --outtype meaning); the default is the named
    MXFP4_MOE mix (experts MXFP4, rest Q8_0, small tensors F32); --expert-type still splits; the resolved
    mix is printed before the file is written."""
    ck = synth_config(preset_config("v3-tiny"), tmp_path / "v3")
    r = cli("export", str(ck), "--gguf", "--out", str(tmp_path / "f.gguf"), "--type", "f32", "--no-modelfile")
    assert r.returncode == 0, r.stderr
    assert set(_gguf_types(tmp_path / "f.gguf").values()) == {"F32"}
    assert "type mix: routed experts F32 x" in r.stderr
    r = cli("export", str(ck), "--gguf", "--out", str(tmp_path / "d.gguf"), "--no-modelfile")
    assert r.returncode == 0, r.stderr
    d = _gguf_types(tmp_path / "d.gguf")
    assert {t for n, t in d.items() if "_exps." in n} == {"MXFP4"}
    assert {t for n, t in d.items() if "_exps." not in n} == {"Q8_0", "F32"}
    assert "routed experts MXFP4 x9; MLA k_b/v_b Q8_0 x8" in r.stderr
    assert r.stderr.index("type mix") < len(r.stderr) and "wrote" in r.stdout
    r = cli("export", str(ck), "--gguf", "--out", str(tmp_path / "m.gguf"), "--type", "MXFP4_MOE", "--no-modelfile")
    assert r.returncode == 0 and _gguf_types(tmp_path / "m.gguf") == d
    r = cli("export", str(ck), "--gguf", "--out", str(tmp_path / "s.gguf"), "--type", "f16", "--expert-type",
            "q4_0", "--no-modelfile")
    s = _gguf_types(tmp_path / "s.gguf")
    assert r.returncode == 0 and {t for n, t in s.items() if "_exps." in n} == {"Q4_0"}
    assert {t for n, t in s.items() if "_exps." not in n} == {"F16", "F32"}


def test_gguf_refuses_config_llama_cpp_cannot_load(tmp_path: Path) -> None:
    """A V4 config with the compress ratio 16 (the bundled trained fixture's) and a 32-wide indexer head:
    one line naming both constraints and where llama.cpp states them, exit 2, no file written."""
    cfg = preset_config("v4-flash-tiny")
    cfg.update(compress_ratios=[0, 4, 16, 4, 0], index_head_dim=32)
    ck = synth_config(cfg, tmp_path / "v4")
    out = tmp_path / "x.gguf"
    r = cli("export", str(ck), "--gguf", "--out", str(out))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "llama.cpp cannot load" in lines[0], r.stderr
    assert "compress_ratios contain [16]" in lines[0] and "index_head_dim is 32" in lines[0]
    assert "deepseek4.cpp" in lines[0]
    assert not out.exists() and not (tmp_path / "Modelfile").exists()


def test_tiny_v4_preset_gguf_loads_in_llama_cpp(tmp_path: Path) -> None:
    """The synth preset itself (not a test-only config) exports to a GGUF llama.cpp loads and runs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    r = cli("synth", "--preset", "v4-flash-tiny", "--out", str(tmp_path / "v4"))
    assert r.returncode == 0, r.stderr
    r = cli("export", str(tmp_path / "v4"), "--gguf", "--out", str(tmp_path / "v4.gguf"))
    assert r.returncode == 0, r.stderr
    assert "MXFP4 tensors re-packed losslessly" in r.stdout
    llm = llama_cpp.Llama(model_path=str(tmp_path / "v4.gguf"), n_ctx=256, n_threads=1, verbose=False)
    llm.eval([0] + list(range(2, 140)))          # > 128 tokens: the ratio-128 layer has a compressed block
    assert llm.n_tokens == 139
    llm.close()


def test_nvfp4_artifact_to_mxfp4_gguf_says_it_requantizes(tmp_path: Path) -> None:
    ck = synth_config(preset_config("v3-tiny"), tmp_path / "v3")
    r = cli("quantize", str(ck), "--fp4", "--out", str(tmp_path / "nv"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    r = cli("export", str(tmp_path / "nv"), "--gguf", "--out", str(tmp_path / "nv.gguf"))
    assert r.returncode == 0, r.stderr
    assert "FP4 tensors re-quantized (lossy" in r.stdout and "nvfp4_ct -> MXFP4" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------ small frictions (#20 item 6)
@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Path:
    return synth_config(preset_config("v3-tiny"), tmp_path_factory.mktemp("v3") / "v3")


def test_run_on_a_gguf_file_says_what_to_do(v3: Path, tmp_path: Path) -> None:
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    r = cli("run", str(g), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "takes a checkpoint directory" in r.stderr and "llama-cli -m" in r.stderr and "verify" in r.stderr
    assert "is a file" not in r.stderr.replace("not a file", "")


def test_ctx_beyond_model_limit_refused(v3: Path) -> None:
    import json
    lim = json.loads((v3 / "config.json").read_text())["max_position_embeddings"]
    for args in (["verify", str(v3), str(v3), "--ctx", str(lim + 1)],
                 ["run", str(v3), "--prompt", "hi", "--max-seq-len", str(lim + 1)]):
        r = cli(*args)
        assert r.returncode == 2 and f"exceeds the model's context limit of {lim} tokens" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_export_default_output_name(v3: Path, tmp_path: Path) -> None:
    r = cli("export", str(v3), "--gguf", "--type", "q8_0", "--no-modelfile", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v3-Q8_0.gguf").is_file() and str(tmp_path / "v3-Q8_0.gguf") in r.stdout


def test_verify_and_demo_ctx_defaults_agree(v3: Path) -> None:
    """One rule (verify.default_ctx) for both: a trained fixture's training context (128 for the bundled
    tiny V3), else 512; the demo has no default of its own."""
    import json

    from v4convert.cli import demo_cmd
    from v4convert.demo import bundled_model
    from v4convert.verify import VerifyOptions, default_ctx
    src = bundled_model("v3")
    assert default_ctx(src) == json.loads((src / "train_report.json").read_text())["ctx"] == 128
    assert default_ctx(v3) == VerifyOptions.ctx == 512
    (ctx_opt,) = [p for p in demo_cmd.params if p.name == "ctx"]
    assert ctx_opt.default is None


# ------------------------------------------------------------------------------------ threads (#20 item 4)
def test_thread_defaults_never_oversubscribe() -> None:
    from v4convert.threads import free_cores, split_threads, usable_cores
    assert 1 <= free_cores() <= usable_cores() <= (os.cpu_count() or 1)
    for cores in (1, 2, 3, 8, 16):
        assert split_threads(None, cores) == (cores, 1)
        for w in (1, 2, 3, 5, 32):
            n, t = split_threads(w, cores)
            assert n == w and t >= 1 and n * t <= max(w, cores), (w, cores, n, t)


# ------------------------------------------------------------------------------------ README / demo (#20 item 5)
ROOT = Path(__file__).resolve().parents[1]


def test_readme_names_only_files_the_repo_has() -> None:
    import re
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:md|py|sh|json|txt))`", text))
    named |= set(re.findall(r"\]\(([\w./-]+)\)", text))                  # markdown links
    bare = set(re.findall(r"`([\w-]+\.(?:py|sh|md))`", text))             # bench scripts, modules, docs
    assert named and bare, "the README names no files: the check would be empty"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    missing += sorted(n for n in bare if not any((ROOT / d / n).exists() for d in ("", "bench", "v4convert", "tools")))
    assert not missing, missing


def test_demo_next_steps_plot_only_where_it_runs(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from v4convert import demo
    art = tmp_path / "nvfp4"
    with_mpl = "\n".join(demo.next_steps(tmp_path, art))
    if importlib.util.find_spec("matplotlib") is not None:
        assert f"--plot {tmp_path / 'plot.png'}" in with_mpl
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    base = "\n".join(demo.next_steps(tmp_path, art))
    assert "--plot" not in base.split("(for a --plot")[0] and "pip install 'v4convert[plot]'" in base
    assert str(demo.bundled_model("v3")) in base and str(art) in base


def test_run_default_kv_length_fits_the_model() -> None:
    """The bundled model allows 1024 positions: run's default KV length follows it (not a fixed 4096)."""
    from v4convert.demo import bundled_model
    r = cli("run", str(bundled_model("v3")), "--prompt", "def ", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stdout


# ------------------------------------------------------------------------------------ inspect --memory / --device
REF = ROOT / "v4convert" / "data" / "ref"


def _fit(path: str, *args: str) -> dict:
    """inspect's memory report, in process (the CLI wiring is checked by the error test below)."""
    from v4convert.inspect import build_report
    from v4convert.memfit import Budget, parse_devices, parse_size
    o = dict(zip(args[::2], args[1::2]))
    n, size = parse_devices(o["--device"]) if "--device" in o else (1, parse_size(o["--memory"]))
    return build_report(Path(path), Budget(n, size, parse_size(o.get("--reserve", "1GB"))),
                        int(o.get("--kv-tokens", 32768)))["memory_fit"]


def test_memory_fit_full_size_reference_configs() -> None:
    """V3 671B: MLA cache = 61 layers x (512 latent + 64 rope) x 2 bytes per token; no FP4 recipe fits on
    2 x 32 GiB (dual RTX 5090: ~340 GiB of weights); on 512 GiB (a Mac Studio) the FP4 ones fit with room
    for millions of tokens while GGUF Q8_0 does not. V4-Flash's FP4 outputs fit in 192 GiB."""
    f = _fit(str(REF / "deepseek-v3-671b.config.json"), "--device", "2x32GB", "--kv-tokens", "32768")
    assert f["kv_bytes"] == 61 * 576 * 2 * 32768 and f["devices"] == 2 and f["per_device_bytes"] == 32 << 30
    assert not any(r["fits"] for r in f["recipes"].values())
    r = f["recipes"]["nvfp4-experts"]
    assert r["spare_bytes"] == 2 * (31 << 30) - r["total_bytes"] < 0
    f = _fit(str(REF / "deepseek-v3-671b.config.json"), "--memory", "512GB", "--kv-tokens", "131072")
    assert f["recipes"]["nvfp4-experts"]["fits"] and f["recipes"]["gguf-mxfp4-moe"]["fits"]
    assert not f["recipes"]["gguf-q8_0"]["fits"]
    r = f["recipes"]["mxfp4-experts"]
    assert r["max_kv_tokens"] * 61 * 576 * 2 <= 511 * 2**30 - r["weights_bytes"] < (r["max_kv_tokens"] + 1) * 61 * 576 * 2
    f = _fit(str(REF / "deepseek-v4-flash.config.json"), "--memory", "192GB")
    assert f["recipes"]["mxfp4-experts"]["fits"] and not f["recipes"]["gguf-q8_0"]["fits"]


def test_memory_fit_tiny_checkpoint_and_layer_split(v3: Path) -> None:
    f = _fit(str(v3), "--memory", "64MB", "--reserve", "0", "--kv-tokens", "1000")
    assert f["kv_bytes"] == 3 * (64 + 16) * 2 * 1000           # 3 layers x (kv_lora 64 + rope 16) x BF16
    assert all(r["fits"] and r["spare_bytes"] == (64 << 20) - r["total_bytes"] for r in f["recipes"].values())
    w = f["recipes"]["gguf-q8_0"]["weights_bytes"]
    # the same total split over many devices each smaller than one layer: the total fits, a layer does not
    n = 64
    f = _fit(str(v3), "--device", f"{n}x{(w // 8) >> 10}K", "--reserve", "0", "--kv-tokens", "1")
    r = f["recipes"]["gguf-q8_0"]
    assert r["spare_bytes"] > 0 and not r["fits"]


def test_memory_spec_errors_are_one_line(v3: Path) -> None:
    r = cli("inspect", str(v3), "--device", "2x1GB")
    assert r.returncode == 0 and "memory fit (2 x 1 GiB" in r.stdout and "gguf-q8_0" in r.stdout, r.stderr
    for args in (["--memory", "lots"], ["--device", "twox32GB"], ["--memory", "1GB", "--device", "2x1GB"]):
        r = cli("inspect", str(v3), *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------------------------ verify --dynamic-top-p
def test_verify_reports_experts_per_token_for_dynamic_routing(tmp_path: Path) -> None:
    """The trained tiny V3 against itself: top-p 1.0 keeps every top-k expert (experts/token == k exactly;
    the dynamic path only reorders float sums: KLD at rounding level, measured max 2.7e-7); a lower top-p
    routes fewer experts per token and costs KLD far above that."""
    import json

    from v4convert.runtime import DynamicRouting

    from v4convert.demo import bundled_model
    from v4convert.verify import VerifyOptions, verify
    src = bundled_model("v3")
    k = json.loads((src / "config.json").read_text())["num_experts_per_tok"]
    opts = VerifyOptions(ctx=64, tokens=256, gen_tokens=4, gen_prompts=1, hidden_tokens=8)
    cache = tmp_path / "ref.safetensors"
    full = verify(src, src, opts=opts, save_ref=cache, dynamic_routing=DynamicRouting(1.0, 1, k))
    assert full["routing"]["experts_per_token"] == k and full["kld"]["max"] < 1e-6
    low = verify(src, src, ref_cache=cache, dynamic_routing=DynamicRouting(0.5, 1, k))
    ro = low["routing"]
    assert 1 <= ro["experts_per_token"] < k and ro["compute_saved"] == pytest.approx(1 - ro["experts_per_token"] / k)
    assert low["kld"]["mean"] > 100 * full["kld"]["mean"] and low["kld"]["mean"] > 1e-4
    assert "routed experts" in __import__("v4convert.verify", fromlist=["format_report"]).format_report(low)
