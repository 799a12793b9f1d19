"""``v4convert verify REF FILE.gguf``: the artifact runs in llama.cpp itself (llama-cpp-python, CPU, F32 KV cache).

On the bundled trained tiny V3: the F32 GGUF agrees with our runtime on REF to KLD ~1e-8 and top-1 100 %, greedy
identical; the default mix (Q8_0 main, MXFP4 experts) gives a real, small loss that ``--max-kld`` catches.
llama.cpp has no per-layer hidden states: the report says "n/a", not zero.

A transformers-5 style config has no ``scoring_func``: the exporter must then use the family's sigmoid gating
(``test_config_without_scoring_func`` guards that regression on a copy of the bundled model without the key).
Small settings (2 windows of 64 tokens, 1 greedy prompt of 4 tokens) keep each run to a few seconds.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from v4convert.artifacts import ArtifactError, open_runner
from v4convert.cli import main
from v4convert.demo import bundled_model
from v4convert.export.gguf.exporter import GGUFType, TypeMix, export_gguf

SMALL = ["--ctx", "64", "--tokens", "126", "--gen-tokens", "4", "--gen-prompts", "1", "--threads", "1"]
F32_MIX = TypeMix(GGUFType.F32, GGUFType.F32)



@pytest.fixture(scope="module")
def ref() -> Path:
    """The bundled trained tiny V3, as shipped."""
    return bundled_model("v3")


@pytest.fixture(scope="module")
def f32_gguf(ref, tmp_path_factory) -> Path:
    return export_gguf(ref, tmp_path_factory.mktemp("f32") / "m.gguf", F32_MIX, modelfile=False).paths[0]


def _verify(ref: Path, art: Path, out: Path, *extra: str):
    r = CliRunner().invoke(main, ["verify", str(ref), str(art), *SMALL, "--json", str(out), *extra])
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_f32_gguf_matches_runtime(ref, f32_gguf, tmp_path):
    r, j = _verify(ref, f32_gguf, tmp_path / "r.json", "--max-kld", "1e-6", "--min-top1", "1.0")
    assert r.exit_code == 0, r.output
    print(f"F32 GGUF: KLD mean {j['kld']['mean']:.3g} max {j['kld']['max']:.3g}, top-1 {j['top1_agreement']}")
    assert j["artifact"]["kind"] == "gguf" and j["settings"]["scored_tokens"] == 126
    assert j["kld"]["mean"] <= 1e-6 and j["kld"]["max"] <= 1e-5 and j["top1_agreement"] == 1.0
    assert abs(j["ppl"]["ratio"] - 1.0) < 1e-4
    assert j["greedy"]["prefix_agreement"] == 1.0
    assert j["hidden"] == {"available": False, "reason": "the artifact runner does not expose hidden states",
                           "rel_err": []}
    for k in ("prefill_tok_s", "decode_tok_s"):
        assert math.isfinite(j["artifact"][k]) and j["artifact"][k] > 0, k
    assert "hidden rel err  n/a" in r.output


def test_default_mix_gguf_plausible_loss(ref, tmp_path):
    """Q8_0 attention/shared/dense + MXFP4 experts: measured KLD mean ~1.5e-3, top-1 ~92 %, PPL ratio ~0.99."""
    gguf = export_gguf(ref, tmp_path / "mix.gguf", TypeMix(), modelfile=False).paths[0]
    r, j = _verify(ref, gguf, tmp_path / "r.json", "--max-kld", "1e-6")
    assert r.exit_code == 1 and "--max-kld" in r.output, r.output      # the threshold sees the loss
    print(f"default mix GGUF: KLD mean {j['kld']['mean']:.3g}, top-1 {j['top1_agreement']:.4f}, "
          f"PPL ratio {j['ppl']['ratio']:.4f}")
    assert 1e-4 < j["kld"]["mean"] < 0.02 and j["top1_agreement"] > 0.85
    assert 0.97 < j["ppl"]["ratio"] < 1.03


def test_runner_cache_positions(f32_gguf):
    """Prefill then decode steps give the logits of one prefill; restarting at 0 or rewinding to an earlier
    position replaces the cache (same logits as a fresh run)."""
    ids = torch.arange(40, 60, dtype=torch.long)[None] * 7 % 1000
    run = open_runner(f32_gguf, max_seq_len=64)
    try:
        assert run.vocab_size == 1000 and run.hidden_states() is None
        full = run.forward(ids, 0)
        assert full.shape == (20, 1000) and full.dtype == torch.float32
        steps = [run.forward(ids[:, :12], 0)] + [run.forward(ids[:, i:i + 1], i) for i in range(12, 20)]
        assert torch.allclose(torch.cat(steps), full, rtol=0, atol=1e-4)
        other = run.forward(ids.flip(1), 0)                  # new sequence: nothing of the old one left
        assert not torch.allclose(other, full, atol=1e-2)
        tail = run.forward(ids[:, 12:], 12)                  # rewind: positions 12.. after a different prefix
        assert not torch.allclose(tail, full[12:], atol=1e-2)
        run.forward(ids[:, :12], 0)
        assert torch.allclose(run.forward(ids[:, 12:], 12), full[12:], rtol=0, atol=1e-4)
        with pytest.raises(ArtifactError, match="token id 1000 outside"):
            run.forward(torch.tensor([[5, 1000]]), 0)
        with pytest.raises(ArtifactError, match="outside the cached"):
            run.forward(ids, 30)
    finally:
        run.close()


def test_bad_gguf_requests_are_one_line_errors(ref, f32_gguf, tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["verify", str(ref), str(f32_gguf), *SMALL, "--dtype", "bfloat16"])
    assert r.exit_code == 2 and "--dtype must stay float32" in r.output and str(f32_gguf) in r.output
    bogus = tmp_path / "junk.gguf"
    bogus.write_bytes(b"GGUF not really")
    r = CliRunner().invoke(main, ["verify", str(ref), str(bogus), *SMALL])
    # refused by our validating reader before llama.cpp (which trusts its input) sees it
    assert r.exit_code == 2 and "junk.gguf" in r.output and "truncated GGUF file" in r.output
    monkeypatch.setitem(sys.modules, "llama_cpp", None)      # as if llama-cpp-python were not installed
    r = CliRunner().invoke(main, ["verify", str(ref), str(f32_gguf), *SMALL])
    assert r.exit_code == 2 and "install llama-cpp-python" in r.output
    assert len(r.output.strip().splitlines()) == 1          # one line, refused before any pass ran


def test_config_without_scoring_func(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bundled_model("v3"), src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["scoring_func"], cfg["topk_method"]
    (src / "config.json").write_text(json.dumps(cfg))
    gguf = export_gguf(src, tmp_path / "m.gguf", F32_MIX, modelfile=False).paths[0]
    r, j = _verify(src, gguf, tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert j["kld"]["mean"] <= 1e-6 and j["top1_agreement"] == 1.0
