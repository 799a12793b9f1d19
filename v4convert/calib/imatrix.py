"""``v4convert calibrate CKPT --calib [PATH] --imatrix OUT.gguf``: llama.cpp's importance matrix from our own
calibration pass (``collect.collect_stats`` with ``propagate=False``: no quantization, every layer sees the
original model's hidden states, as llama-imatrix runs the unquantized model).

Per weight matrix and input column j, llama-imatrix accumulates ``sum over tokens of x_j^2`` and the token count
(``tools/imatrix/imatrix.cpp``); here that is the diagonal of ``LinearStats.xtx`` (float64 sum of x x^T) and
``LinearStats.count``. Routed experts of one layer and projection are stacked as the n_mat rows of their GGUF
``ffn_*_exps`` tensor (an expert no calibration token reached: sums 0, count 0, which llama.cpp's quantizer
treats as uniform). Names are the GGUF tensor names our exporter writes (``export/gguf/names.py``).

Not covered (llama.cpp quantizes them without an imatrix): ``output.weight`` (collect_stats records block
linears only), ``token_embd`` (a lookup, llama.cpp collects nothing for it either), MTP blocks (not run), the
router (kept F32) and MLA ``attn_k_b`` / ``attn_v_b`` (the split ``kv_b``: their inputs are the per-head
q_nope and the latent attention output, which our non-absorbed runtime does not form; our exporter pins both to
Q8_0, which ignores an imatrix anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from v4convert.checkpoint import Checkpoint
from v4convert.export.gguf.imatrix import Imatrix, write_imatrix
from v4convert.export.gguf.names import GGUFNameError, Kind, Precision, entry
from v4convert.export.gguf.types import ARCH_OF

from .collect import Collected, collect_stats
from .data import CalibData

IMATRIX_PRECISIONS = (Precision.MAIN, Precision.EXPERT)


@dataclass
class Target:
    name: str                # checkpoint tensor name
    gguf: str                # GGUF weight name
    expert: int | None       # row of the stacked tensor (routed experts), else None


def imatrix_targets(ckpt: Path) -> tuple[list[Target], int]:
    """The block linears of the main model that the GGUF exporter writes as quantizable 2-D/stacked weights,
    and the number of routed experts."""
    out = []
    with Checkpoint.open(ckpt) as ck:
        arch = ARCH_OF[ck.family]
        n_main, n_exp = ck.arch.n_layers, ck.arch.n_experts
        for info in ck.infos():
            if info.layer is None or info.mtp or info.layer >= n_main or not info.role.is_linear:
                continue
            try:
                e = entry(arch, info.role, info.name)
            except GGUFNameError:          # no place in the arch: the exporter skips it too
                continue
            if e.precision not in IMATRIX_PRECISIONS or e.kind not in (Kind.PLAIN, Kind.EXPERTS):
                continue
            (g,) = e.format(info.layer)
            out.append(Target(info.name, g, info.expert if e.kind is Kind.EXPERTS else None))
    return out, n_exp


def imatrix_from_stats(targets: list[Target], n_experts: int, col: Collected, data: CalibData) -> Imatrix:
    """Stack ``col``'s per-linear diagonals into llama.cpp entries (see the module docstring)."""
    by: dict[str, list[Target]] = {}
    for t in targets:
        by.setdefault(t.gguf, []).append(t)
    entries = {}
    for g, ts in by.items():
        if ts[0].expert is None:
            st = col.stats.get(ts[0].name)
            if st is None:
                continue
            entries[g] = (st.xtx.diagonal().numpy().astype(np.float32)[None, :],
                          np.array([st.count], np.float32))
            continue
        seen = [col.stats.get(t.name) for t in ts]
        if all(s is None for s in seen):
            continue
        K = next(s for s in seen if s is not None).xtx.shape[0]
        sums = np.zeros((n_experts, K), np.float32)
        counts = np.zeros(n_experts, np.float32)
        for t, s in zip(ts, seen):
            if s is not None:
                sums[t.expert] = s.xtx.diagonal().numpy()
                counts[t.expert] = s.count
        entries[g] = (sums, counts)
    W, L = data.windows.shape
    return Imatrix(entries, [data.source], chunk_count=W, chunk_size=L)


def calibrate_imatrix(ckpt: Path, data: CalibData, out: Path, *, overwrite: bool = False,
                      progress: bool = False, collected: Collected | None = None) -> dict:
    """Run the statistics pass on ``ckpt`` (or take ``collected``, an unquantized pass over at least the
    imatrix targets) and write ``out`` (GGUF imatrix). Returns a small report."""
    from v4convert import __version__, outputs

    out = Path(out)
    if out.suffix != ".gguf":
        from .data import CalibDataError
        raise CalibDataError(f"{out}: the imatrix file name must end in .gguf (llama.cpp's GGUF imatrix format)")
    outputs.claim(out, sources=[Path(ckpt)], overwrite=overwrite)
    targets, n_exp = imatrix_targets(ckpt)
    col = collected or collect_stats(ckpt, data, [t.name for t in targets], propagate=False, progress=progress)
    im = imatrix_from_stats(targets, n_exp, col, data)
    write_imatrix(out, im, extra={outputs.GGUF_MARKER_KEY: __version__})
    n_exps = [n for n in im.entries if "_exps." in n]
    zero = sum(int((im.entries[n][1] == 0).sum()) for n in n_exps)
    return {"out": str(out), "entries": len(im.entries), "expert_entries": len(n_exps),
            "experts_without_tokens": zero, "tokens": data.n_tokens,
            "chunks": im.chunk_count, "chunk_size": im.chunk_size, "source": data.source,
            "uncovered": sorted({t.gguf for t in targets} - set(im.entries))}
