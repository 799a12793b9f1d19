"""What llama.cpp's loaders and graphs accept, per GGUF arch, checked before we write a byte.

A GGUF llama.cpp refuses is a wasted export (minutes to hours at full size) and a confusing failure
far from its cause, so ``export --gguf`` refuses up front with one line. One table: arch -> checks,
each with the llama.cpp source it comes from (read in the llama.cpp vendored by llama-cpp-python
0.3.36: ``vendor/llama.cpp/src``). The published V3/V3.1/V3.2/V4 configs pass every check.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from v4convert.export.gguf.names import GGUFArch
from v4convert.families.layout import Arch


V4_RATIOS = (0, 4, 128)     # deepseek4.cpp load_arch_tensors: "only supports compression ratios 0, 4, and 128"
V4_HC_MULT = 4              # deepseek4.cpp build_hc_pre: GGML_ASSERT(hc == 4)
HADAMARD_MIN = 64           # llama-kv-cache.cpp build_input_k_rot: the indexer's Hadamard rotation is >= 64 wide
V4_SCORING = "sqrtsoftplus"  # deepseek4.cpp load_arch_hparams: "expects sqrtsoftplus MoE scoring"


@dataclass(frozen=True)
class Check:
    what: str                                   # the constraint, as the user reads it
    source: str                                 # where llama.cpp states it
    bad: Callable[[Arch, dict], str | None]     # -> what is wrong in this config, or None


def _v4_ratios(a: Arch, cfg: dict) -> str | None:
    bad = sorted({r for r in a.compress_ratios if r not in V4_RATIOS})
    return f"compress_ratios contain {bad}" if bad else None


def _hc(a: Arch, cfg: dict) -> str | None:
    return None if a.hc_mult == V4_HC_MULT else f"hc_mult is {a.hc_mult}"


def _index_dim(a: Arch, cfg: dict) -> str | None:
    d = int(cfg.get("index_head_dim") or 0)
    return None if d % HADAMARD_MIN == 0 and d > 0 else f"index_head_dim is {d}"


def _scoring(a: Arch, cfg: dict) -> str | None:
    s = cfg.get("scoring_func", V4_SCORING)
    return None if s == V4_SCORING else f"scoring_func is {s!r}"


CHECKS: dict[GGUFArch, tuple[Check, ...]] = {
    GGUFArch.DEEPSEEK2: (),
    GGUFArch.DEEPSEEK32: (
        Check(f"index_head_dim a multiple of {HADAMARD_MIN}", "llama-kv-cache.cpp build_input_k_rot", _index_dim),
    ),
    GGUFArch.DEEPSEEK4: (
        Check("compress ratios 0, 4 or 128 only", "models/deepseek4.cpp load_arch_tensors", _v4_ratios),
        Check(f"hc_mult {V4_HC_MULT}", "models/deepseek4.cpp build_hc_pre", _hc),
        Check(f"index_head_dim a multiple of {HADAMARD_MIN}", "llama-kv-cache.cpp build_input_k_rot", _index_dim),
        Check(f"{V4_SCORING} expert scoring", "models/deepseek4.cpp load_arch_hparams", _scoring),
    ),
}


def violations(arch: GGUFArch, a: Arch, cfg: dict) -> list[str]:
    """One phrase per llama.cpp constraint this config breaks (empty: llama.cpp can load it)."""
    out = []
    for c in CHECKS[arch]:
        why = c.bad(a, cfg)
        if why is not None:
            out.append(f"{why} (llama.cpp's {arch.value} needs {c.what}: {c.source})")
    return out
