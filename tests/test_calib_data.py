"""--calib data: txt / jsonl / directory, the bundled training split (never the held-out text), errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v4convert.calib.data import (
    CORPUS_DIR,
    CalibDataError,
    calibration_windows,
    read_texts,
    training_split_texts,
)

TINY = Path(__file__).resolve().parent.parent / "v4convert" / "data" / "tiny-v3"
TEXT = "def f(x):\n    return x * 2\n" * 200


def test_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": TEXT, "id": i}) for i in range(2)) + "\n\n")
    d = calibration_windows(TINY, tmp_path / "a.txt", n_tokens=300, seq_len=64)
    assert d.windows.shape == (5, 64)                       # ceil(300 / 64) windows
    j = calibration_windows(TINY, tmp_path / "b.jsonl", n_tokens=64, seq_len=64)
    assert j.windows.shape == (1, 64) and bool((j.windows[0] == d.windows[0]).all())
    assert read_texts(tmp_path) == [TEXT, TEXT, TEXT]       # sorted: a.txt, then b.jsonl's two records
    (tmp_path / "ignored.bin").write_bytes(b"\xff")
    assert len(read_texts(tmp_path)) == 3
    big = calibration_windows(TINY, tmp_path, n_tokens=10**7, seq_len=64)   # data runs out: all whole windows
    assert big.windows.shape[0] > 5 and big.n_tokens == big.windows.numel()


def test_default_is_the_training_split_never_heldout():
    man = json.loads((CORPUS_DIR / "MANIFEST.json").read_text())
    train = {f["sha256"] for f in man["files"] if f["split"] == "train"}
    texts = training_split_texts()
    assert len(texts) == len(train)
    held = (CORPUS_DIR / "heldout.txt").read_text()
    for t in texts[:40]:
        assert hashlib.sha256(t.encode()).hexdigest() in train
        assert t[:200] not in held
    d = calibration_windows(TINY, None, n_tokens=1000, seq_len=100)
    assert d.windows.shape == (10, 100) and d.source == "bundled training split"


@pytest.mark.parametrize("content,match", [
    (None, "not found"), ("", "empty"), ("  \n", "empty"), ("a b", "fewer than one window"),
])
def test_bad_text(tmp_path, content, match):
    p = tmp_path / "c.txt"
    if content is not None:
        p.write_text(content)
    with pytest.raises(CalibDataError, match=match):
        calibration_windows(TINY, p, n_tokens=64, seq_len=64)


def test_bad_sizes_and_dirs(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    for kw, match in (({"n_tokens": 0}, "--calib-tokens must be > 0"), ({"n_tokens": -5}, "> 0"),
                      ({"seq_len": 1}, "--calib-seq-len")):
        with pytest.raises(CalibDataError, match=match):
            calibration_windows(TINY, tmp_path / "a.txt", **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibDataError, match="no .txt or .jsonl"):
        calibration_windows(TINY, tmp_path / "empty")
    with pytest.raises(CalibDataError, match="no tokenizer.json"):
        calibration_windows(tmp_path, tmp_path / "a.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CalibDataError, match="not UTF-8"):
        read_texts(tmp_path / "bin.txt")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.dictionaries(st.sampled_from(["text", "x"]),
                                                                st.one_of(st.text(max_size=8), st.integers()))),
                max_size=5))
def test_jsonl_parser_accepts_only_text_records(tmp_path_factory, rows):
    p = tmp_path_factory.mktemp("j") / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    good = [r["text"] for r in rows if isinstance(r, dict) and isinstance(r.get("text"), str)]
    try:
        texts = read_texts(p)
    except CalibDataError as e:
        assert str(e).startswith(str(p))
        assert len(good) < len(rows) or not any(t.strip() for t in good)
    else:
        assert texts == good and any(t.strip() for t in good)
