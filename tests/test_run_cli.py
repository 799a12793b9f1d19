"""`v4convert run` on the tiny synth presets: streams text, reports tokens/s; bad input -> one-line error."""
from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner

from v4convert.cli import main
from v4convert.runtime import load
from v4convert.runtime.generate import GenerationError, Tokenizer, generate

PROMPT = "Beautiful is better than"



@pytest.mark.parametrize("preset", ["v3-tiny", "v32-tiny", "v4-flash-tiny", "v4-flash-base-tiny"])
def test_run_streams_greedy_text_and_speed(tiny_ckpts, preset):
    path = tiny_ckpts[preset]
    r = CliRunner().invoke(main, ["run", str(path), "--prompt", PROMPT, "--max-new-tokens", "6",
                                  "--max-seq-len", "32"])
    assert r.exit_code == 0, r.output
    lines = r.output.rstrip("\n").split("\n")
    m = re.fullmatch(r"prefill: (\d+) tokens in [\d.]+ s = [\d.]+ tok/s; decode: (\d+) tokens in [\d.]+ s = "
                     r"[\d.]+ tok/s \(stop: (\w+)\)", lines[-1])
    assert m, lines[-1]
    tok = Tokenizer.open(path)
    ids = tok.encode(PROMPT)
    assert int(m.group(1)) == len(ids)
    # the streamed text is exactly the greedy continuation computed through the API
    res = generate(load(path, max_seq_len=32), ids, 6, 0.0, tok.eos_ids)
    assert "\n".join(lines[:-1]) == tok.decode(res.new_ids)
    assert int(m.group(2)) == len(res.new_ids) - 1 and m.group(3) == res.stop_reason


def test_sampling_is_seeded(tiny_ckpts):
    path = tiny_ckpts["v3-tiny"]
    args = ["run", str(path), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "1.5",
            "--max-seq-len", "32"]
    outs = [CliRunner().invoke(main, args + ["--seed", s]) for s in ("1", "1", "2")]
    assert all(o.exit_code == 0 for o in outs)
    text = [o.output.rsplit("prefill:", 1)[0] for o in outs]
    assert text[0] == text[1]
    assert text[0] != text[2]


def test_run_dynamic_routing_reports_experts_per_token(tiny_ckpts):
    r = CliRunner().invoke(main, ["run", str(tiny_ckpts["v3-tiny"]), "--prompt", PROMPT, "--max-new-tokens", "3",
                                  "--max-seq-len", "32", "--dynamic-top-p", "0.3", "--k-min", "1"])
    assert r.exit_code == 0, r.output
    m = re.search(r"dynamic routing: ([\d.]+) experts/token \(top-p 0.3, k 1\.\.3\)", r.output)
    assert m and 1.0 <= float(m.group(1)) < 3.0


def test_missing_tokenizer_is_a_one_line_error(tiny_ckpts, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(tiny_ckpts["v3-tiny"], dst)
    (dst / "tokenizer.json").unlink()
    r = CliRunner().invoke(main, ["run", str(dst), "--prompt", PROMPT])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "tokenizer.json" in r.output and str(dst) in r.output


def test_prompt_longer_than_max_seq_len_is_an_error(tiny_ckpts):
    r = CliRunner().invoke(main, ["run", str(tiny_ckpts["v3-tiny"]), "--prompt", PROMPT * 4, "--max-seq-len", "8"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "longer than --max-seq-len 8" in r.output


def test_generate_api_errors_and_cache_end(tiny_ckpts):
    path = tiny_ckpts["v3-tiny"]
    model = load(path, max_seq_len=10)
    with pytest.raises(GenerationError, match="more than max_seq_len 10"):
        generate(model, list(range(2, 13)), 4)
    res = generate(model, list(range(2, 9)), 50)      # 7 prompt tokens, cache of 10: stops at the cache end
    assert res.stop_reason == "max_seq_len" and len(res.new_ids) == 4
