"""Statistics once, many artifacts: ``calibrate --stats DIR`` saves one unquantized pass; ``quantize --calib-stats
DIR`` reuses it for any calibrated recipe instead of running the pass again.

``DIR/calib-stats.safetensors`` (safetensors, never pickle): per block linear of the main model ``NAME:h``
float32 ``[K, K]`` (``X^T X / n``), ``NAME:amax`` float32 ``[1]``, ``NAME:count`` int64 ``[1]`` — the records of
``calib.apply`` — made with ``propagate=False`` (every layer sees the unquantized model's inputs: the only
statistics that do not depend on the recipe); metadata ``pass`` = JSON of the data and pass settings, ``source``
= SHA-256 of the checkpoint's config.json, ``coverage`` = routed tokens per MoE layer x expert. A directory of
ours (the output rule: built in ``DIR.partial``, marker, swapped in).

A quantize that reuses it behaves as ``--calib --propagate original`` on the same data: the records of the plan's
linears are loaded, ``--min-expert-tokens`` applies as usual, and its own statistics file is written from them
(so the artifact, its resume and its report are those of a normal calibrated run).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


from .apply import record_tensors
from .collect import Collected, collect_stats
from .linstats import LinearStats
from .data import CalibData, CalibDataError

STATS_FILE = "calib-stats.safetensors"
KIND = "calibration-statistics"


@dataclass(frozen=True)
class SavedPass:
    """What a saved pass was made from (the part of ``CalibOptions`` it fixes)."""
    path: Path                 # DIR/calib-stats.safetensors
    data_sha256: str
    tokens: int
    seq_len: int
    all_experts: bool
    source: str                # what the data came from (report)


def config_sha256(ckpt: Path) -> str:
    return hashlib.sha256((Path(ckpt) / "config.json").read_bytes()).hexdigest()


def block_linears(ckpt: Path) -> list[str]:
    """Checkpoint names of every 2-D linear weight of the main model's blocks but the router (MTP blocks never run)."""
    from v4convert.checkpoint import Checkpoint
    from v4convert.families.roles import Role
    with Checkpoint.open(ckpt) as ck:
        n = ck.arch.n_layers
        return [i.name for i in ck.infos()
                if i.layer is not None and not i.mtp and i.layer < n and i.role.is_linear and len(i.shape) == 2
                and i.role is not Role.ROUTER]                 # the router runs as a Gate, never quantized


def save_pass(ckpt: Path, data: CalibData, out: Path, *, all_experts: bool = False, overwrite: bool = False,
              progress: bool = False, collected: Collected | None = None) -> dict:
    """Run the unquantized pass over every block linear (or take ``collected`` from one) and write ``out``."""
    from safetensors.torch import save_file

    from v4convert import outputs
    out = Path(out)
    outputs.recover(out)
    outputs.claim(out, sources=[Path(ckpt)], overwrite=overwrite)
    col = collected or collect_stats(ckpt, data, block_linears(ckpt), propagate=False, all_experts=all_experts,
                                     progress=progress)
    tmp = outputs.partial_path(out)
    outputs.remove_ours(tmp)
    tmp.mkdir(parents=True)
    outputs.write_marker(tmp, KIND, "writing")
    tensors = record_tensors(col.stats, skip={n for n, s in col.stats.items() if s.count == 0})
    meta = {"pass": json.dumps({"data_sha256": data.sha256, "tokens": data.n_tokens,
                                "seq_len": int(data.windows.shape[1]), "all_experts": all_experts,
                                "data_source": data.source}, sort_keys=True),
            "source": config_sha256(ckpt), "coverage": json.dumps(col.coverage)}
    save_file(tensors, str(tmp / STATS_FILE), metadata=meta)
    outputs.write_marker(tmp, KIND, "complete", linears=len(tensors) // 3)
    outputs.swap_in(tmp, out)
    return {"out": str(out), "linears": len(tensors) // 3, "tokens": data.n_tokens, "source": data.source}


def open_pass(stats_dir: Path, ckpt: Path) -> SavedPass:
    """Check ``stats_dir`` is a complete saved pass of ``ckpt``'s model; user errors name the directory."""
    from safetensors import SafetensorError, safe_open

    from v4convert import outputs
    d = Path(stats_dir)
    f = d / STATS_FILE
    m = outputs.read_marker(d) if d.is_dir() else None
    if m is None or m.get("kind") != KIND or m.get("state") != "complete" or not f.is_file():
        raise CalibDataError(f"{d}: not a complete statistics directory of v4convert calibrate --stats "
                             f"(expected {STATS_FILE} and its marker)")
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
        p = json.loads(meta["pass"])
        saved = SavedPass(f, str(p["data_sha256"]), int(p["tokens"]), int(p["seq_len"]), bool(p["all_experts"]),
                          str(p["data_source"]))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise CalibDataError(f"{f}: unreadable statistics file ({type(e).__name__}: {e})") from None
    if meta.get("source") != config_sha256(ckpt):
        raise CalibDataError(f"{f}: made from another model (its config.json differs from {ckpt}'s)")
    return saved


def load_collected(saved: SavedPass, names: list[str]) -> Collected:
    """The records of ``names`` as ``Collected`` (the statistics pass's result type); absent names are simply
    missing (never called by the forward, or no tokens)."""
    from safetensors import safe_open
    stats: dict[str, LinearStats] = {}
    with safe_open(str(saved.path), framework="pt") as f:
        keys = set(f.keys())
        coverage = {int(k): v for k, v in json.loads((f.metadata() or {}).get("coverage", "{}")).items()}
        for n in names:
            if f"{n}:h" not in keys:
                continue
            count = int(f.get_tensor(f"{n}:count")[0])
            # LinearStats keeps the float64 sum x x^T; the file keeps float32 X^T X / n: hessian() returns it exactly
            xtx = f.get_tensor(f"{n}:h").double() * count
            stats[n] = LinearStats(xtx=xtx, amax=float(f.get_tensor(f"{n}:amax")[0]), count=count)
    return Collected(stats=stats, coverage=coverage, tokens=saved.tokens)
