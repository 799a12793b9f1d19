"""Run under torchrun by tests/test_distributed.py: for each case ``PATH:TP:EP`` load this rank's part
(``v4convert.runtime.load``), run a prefill and decode steps with the given tokens, and (rank 0) save the
float32 logits of every step to ``OUT/case{i}.pt``. Every rank checks that all ranks got the same logits.
A case ``PATH:TP:EP:error`` must fail to load on every rank: each rank writes ``OUT/case{i}-rank{r}.err``
(``TYPE: message``) and the launch goes on with the next case."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def run_steps(model, tokens: list[int], n_prompt: int = 8) -> torch.Tensor:
    """float32 logits ``[len(tokens), V]``: prefill of the first ``n_prompt`` tokens, then one decode step per
    remaining token (teacher-forced, so every run sees the same inputs)."""
    prompt, steps = tokens[:n_prompt], tokens[n_prompt:]
    logits = [model(torch.tensor([prompt]), 0)[0]]
    for j, t in enumerate(steps):
        logits.append(model(torch.tensor([[t]]), n_prompt + j)[0])
    return torch.cat(logits)


def main() -> None:
    out, tokens, cases = Path(sys.argv[1]), [int(t) for t in sys.argv[2].split(",")], sys.argv[3:]
    from v4convert.runtime import load
    for i, case in enumerate(cases):
        path, tp, ep, *expect = case.split(":")
        kw = {"max_seq_len": 64, "tp": int(tp) if tp != "-" else None, "ep": int(ep) if ep != "-" else None}
        if expect == ["error"]:
            try:
                load(path, **kw)
                msg = "NO ERROR"
            except Exception as e:       # noqa: BLE001 - the test reads the type and message
                msg = f"{type(e).__name__}: {e}"
            rank = dist.get_rank() if dist.is_initialized() else 0
            (out / f"case{i}-rank{rank}.err").write_text(msg)
            continue
        model = load(path, **kw)
        got = run_steps(model, tokens)
        if dist.is_initialized():
            ref = got.clone()
            dist.broadcast(ref, 0)
            assert torch.equal(ref, got), f"rank {dist.get_rank()}: logits differ from rank 0's"
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(got, out / f"case{i}.pt")
        del model
    from v4convert.runtime.distributed import shutdown
    shutdown()        # the runtime's own exit: gloo ranks meet at a bounded barrier, then destroy the group


if __name__ == "__main__":
    main()
