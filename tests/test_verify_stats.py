"""verify's statistics against a direct numpy computation on small hand-made distributions.

Nothing here calls the code under test to build expectations: KL, top-1, perplexity and delta-p are written out
from their definitions in float64 numpy (llama.cpp ``--kl-divergence`` statistics, DESIGN §7).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v4convert.verify import (RefRecord, VerifyError, greedy_agreement, hidden_report, load_record, reference_view,
                              save_record, summarize, token_stats)

V, S = 7, 5


def _logsoftmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture()
def case():
    rng = np.random.default_rng(3)
    p_logits = rng.normal(0, 2.0, (S, V))
    q_logits = p_logits + rng.normal(0, 0.7, (S, V))
    q_logits[2] = p_logits[2]                      # one position where the artifact is exact
    q_logits[4, np.argmax(p_logits[4])] -= 5.0      # one where the artifact's top-1 differs
    targets = np.array([0, 3, 6, 1, 2])
    return p_logits, q_logits, targets


def _run(p_logits, q_logits, targets, k):
    lp = torch.log_softmax(torch.tensor(p_logits, dtype=torch.float32), -1)
    lq = torch.log_softmax(torch.tensor(q_logits, dtype=torch.float32), -1)
    t = torch.tensor(targets)
    idx, vals, rest, tgt = reference_view(lp, t, k)
    return token_stats(idx, vals, rest, tgt, lq, t)


def test_exact_kl_top1_ppl_delta_p_match_definitions(case):
    p_logits, q_logits, targets = case
    tok = _run(p_logits, q_logits, targets, k=V)
    lp, lq = _logsoftmax(p_logits), _logsoftmax(q_logits)
    p, q = np.exp(lp), np.exp(lq)
    kl = (p * (lp - lq)).sum(-1)
    # verify works from float32 log-probs (eps 6e-8 x |log p| <= ~10): absolute agreement to 2e-6 nats
    np.testing.assert_allclose(tok["kld"].numpy(), kl, rtol=1e-5, atol=2e-6)
    assert tok["kld"][2].item() == pytest.approx(0.0, abs=1e-7)
    top1 = np.argmax(p_logits, -1) == np.argmax(q_logits, -1)
    assert tok["top1"].tolist() == top1.tolist() and not top1[4]
    rows = np.arange(S)
    dp = q[rows, targets] - p[rows, targets]
    np.testing.assert_allclose(tok["dp"].numpy(), dp, rtol=1e-5, atol=1e-6)    # float32 log-probs, as above

    s = summarize(tok)
    got = tok["kld"].numpy()          # aggregation checked on the same per-token values, KL itself above
    assert s["kld"]["mean"] == pytest.approx(got.mean(), rel=1e-12)
    assert s["kld"]["median"] == pytest.approx(np.median(got), rel=1e-12)
    assert s["kld"]["p99"] == pytest.approx(np.percentile(got, 99), rel=1e-12)
    assert s["kld"]["max"] == pytest.approx(got.max(), rel=1e-12)
    assert s["kld"]["mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert s["top1_agreement"] == pytest.approx(top1.mean())
    ppl_ref = math.exp(-lp[rows, targets].mean())
    ppl_art = math.exp(-lq[rows, targets].mean())
    assert s["ppl"]["ref"] == pytest.approx(ppl_ref, rel=1e-5)
    assert s["ppl"]["art"] == pytest.approx(ppl_art, rel=1e-5)
    assert s["ppl"]["ratio"] == pytest.approx(ppl_art / ppl_ref, rel=1e-5)
    assert s["delta_p"]["mean"] == pytest.approx(dp.mean(), rel=1e-5, abs=1e-6)
    assert s["delta_p"]["rms"] == pytest.approx(math.sqrt((dp ** 2).mean()), rel=1e-5)
    for q_ in (1, 10, 50, 90, 99):
        assert s["delta_p"]["percentiles"][f"p{q_}"] == pytest.approx(np.percentile(dp, q_), rel=1e-5, abs=1e-6)


def test_top_k_kl_is_the_coarsened_kl_and_a_lower_bound(case):
    p_logits, q_logits, targets = case
    k = 2
    tok = _run(p_logits, q_logits, targets, k=k)
    lp, lq = _logsoftmax(p_logits), _logsoftmax(q_logits)
    p, q = np.exp(lp), np.exp(lq)
    want = []
    for i in range(S):
        top = np.argsort(-p[i])[:k]
        rest = np.setdiff1d(np.arange(V), top)
        pr, qr = p[i, rest].sum(), q[i, rest].sum()
        want.append((p[i, top] * (lp[i, top] - lq[i, top])).sum() + pr * (math.log(pr) - math.log(qr)))
    np.testing.assert_allclose(tok["kld"].numpy(), want, rtol=1e-5, atol=2e-6)
    exact = (p * (lp - lq)).sum(-1)
    assert (tok["kld"].numpy() <= exact + 1e-7).all()
    # the correct-token statistics do not depend on k (target 6 at row 2 is outside the top-2 there or not)
    full = _run(p_logits, q_logits, targets, k=V)
    np.testing.assert_allclose(tok["dp"].numpy(), full["dp"].numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(tok["nll_ref"].numpy(), full["nll_ref"].numpy(), rtol=0, atol=0)


def test_top1_tie_counts_as_agreement():
    p = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0]]), -1)
    q = torch.log_softmax(torch.tensor([[1.5, 1.5, 0.0]]), -1)      # ref's argmax 0 ties with 1 in Q
    idx, vals, rest, tgt = reference_view(p, torch.tensor([1]), 3)
    assert bool(token_stats(idx, vals, rest, tgt, q, torch.tensor([1]))["top1"][0])


def test_greedy_and_hidden_agreement_by_hand():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    art = torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]])
    g = greedy_agreement(ref, art)
    assert g["prefix_agreement"] == pytest.approx((2 + 4) / 8)
    assert g["position_agreement"] == pytest.approx(7 / 8)
    r = [torch.ones(3, 4), torch.full((3, 4), 2.0)]
    a = [torch.ones(3, 4) * 1.1, torch.full((3, 4), 2.0)]
    h = hidden_report(r, a)
    assert h["available"] and h["rel_err"][0] == pytest.approx(0.1, rel=1e-6) and h["rel_err"][1] == 0.0
    assert not hidden_report(r, [])["available"]


def test_record_round_trip_and_bad_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    rec = RefRecord(windows=torch.randint(0, 9, (2, 4), generator=g), topk_idx=torch.randint(0, 9, (2, 3, 2), generator=g),
                    topk_logp=torch.randn(2, 3, 2, generator=g), rest_logp=torch.randn(2, 3, generator=g).double(),
                    target_logp=torch.randn(2, 3, generator=g), hidden=[torch.randn(3, 5, generator=g)],
                    greedy_prompts=torch.zeros(1, 2, dtype=torch.long), greedy_tokens=torch.ones(1, 3, dtype=torch.long),
                    prefill_tok_s=12.5, decode_tok_s=3.25, meta={"vocab": 9, "options": {}, "data": "x",
                                                                  "data_sha256": "0"})
    f = tmp_path / "ref.safetensors"
    save_record(rec, f)
    back = load_record(f)
    for name in ("windows", "topk_idx", "topk_logp", "rest_logp", "target_logp", "greedy_prompts", "greedy_tokens"):
        assert torch.equal(getattr(back, name), getattr(rec, name)), name
    assert torch.equal(back.hidden[0], rec.hidden[0]) and back.decode_tok_s == 3.25
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(VerifyError, match="bad.safetensors"):
        load_record(bad)


class _TableRunner:
    """A stand-in artifact runner (the Runner interface without a model): logits = table[token]."""

    def __init__(self, vocab: int, seed: int, fail_after: int | None = None) -> None:
        self.vocab_size = vocab
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        self.fail_after, self.windows_run = fail_after, 0

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        if ids.shape[1] > 4:                          # a scoring window, not a greedy step
            if self.fail_after is not None and self.windows_run >= self.fail_after:
                raise RuntimeError("killed")
            self.windows_run += 1
        return self.table[ids[0]]

    def hidden_states(self):
        return None

    def close(self) -> None:
        pass


def test_reference_pass_resumes_from_parts(tmp_path):
    from v4convert.verify import VerifyOptions, artifact_pass, reference_pass

    V_, W, L = 11, 5, 9
    windows = torch.randint(0, V_, (W, L), generator=torch.Generator().manual_seed(1))
    opts = VerifyOptions(ctx=L, tokens=W * (L - 1), top_k=4, gen_tokens=3, gen_prompts=2, prompt_len=3)
    meta = {"vocab": V_, "options": opts.__dict__.copy(), "data": "t", "data_sha256": "0"}
    fresh = reference_pass(_TableRunner(V_, 0), windows, opts, meta)
    save = tmp_path / "ref.safetensors"
    with pytest.raises(RuntimeError, match="killed"):
        reference_pass(_TableRunner(V_, 0, fail_after=2), windows, opts, meta, save=save)
    assert len(list((tmp_path / "ref.safetensors.parts").glob("window-*.safetensors"))) == 2 and not save.exists()
    with pytest.raises(VerifyError, match="other settings"):
        reference_pass(_TableRunner(V_, 0), windows, opts, dict(meta, data_sha256="1"), save=save)
    again = _TableRunner(V_, 0)
    resumed = reference_pass(again, windows, opts, meta, save=save)
    assert again.windows_run == W - 2                      # the two finished windows were not run again
    assert save.exists() and not (tmp_path / "ref.safetensors.parts").exists()
    for name in ("topk_idx", "topk_logp", "rest_logp", "target_logp", "greedy_tokens"):
        assert torch.equal(getattr(resumed, name), getattr(fresh, name)), name
    # the same model as artifact: exact agreement, no hidden states from this runner
    r = artifact_pass(_TableRunner(V_, 0), load_record(save), opts)
    assert r["kld"]["max"] == 0.0 and r["top1_agreement"] == 1.0 and not r["hidden"]["available"]
    other = artifact_pass(_TableRunner(V_, 5), load_record(save), opts)
    assert other["kld"]["mean"] > 0.1
