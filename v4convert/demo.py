"""``v4convert demo``: the whole pipeline on the bundled trained tiny V3 model, offline, in minutes.

quantize to NVFP4 (compressed-tensors) and MXFP4 -> verify each against the bundled FP8 release on the
bundled held-out text (one reference pass, cached and reused) -> comparison table and where the files are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import api
from .verify import DEFAULT_DATA, VerifyOptions, format_comparison, json_report, verify
from v4convert.errors import UserError

DATA = Path(__file__).parent / "data"


class DemoError(UserError):
    pass


def bundled_model(family: str) -> Path:
    """Directory of a bundled trained tiny model (``v3`` or ``v4``), in its published layout."""
    p = DATA / f"tiny-{family}"
    if not (p / "config.json").is_file():
        raise DemoError(f"{p}: bundled trained model missing (reinstall v4convert, or run "
                        f"python tools/train_tiny.py train --family {family})")
    return p


@dataclass(frozen=True)
class Variant:
    label: str
    dirname: str
    scheme: str                 # quantize's --scheme (its default recipe)
    method: str | None = None   # a calibrated --method (on the bundled training split), None: data-free default


# What the demo makes: the two default FP4 recipes of ``v4convert quantize``, and one calibrated row
# (calibrated on the bundled training split, never the held-out text verify scores).
VARIANTS: tuple[Variant, ...] = (
    Variant("NVFP4 experts (RTN)", "nvfp4", "nvfp4"),
    Variant("MXFP4 experts (OCP floor)", "mxfp4", "mxfp4"),
    Variant("NVFP4 experts (GPTQ+4/6, calib)", "nvfp4-gptq", "nvfp4", "gptq+four-over-six"),
)
DEMO_CALIB_TOKENS, DEMO_CALIB_SEQ_LEN = 2048, 256


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quantize_variant(src: Path, out: Path, scheme: str, method: str | None = None) -> None:
    """Quantize ``src`` into ``out`` with ``scheme``'s default recipe through the Python API (one in-process
    worker, replacing ``out``); ``method``: calibrate with it on the bundled training split."""
    calib = {} if method is None else {"method": method, "calib": True, "calib_tokens": DEMO_CALIB_TOKENS,
                                       "calib_seq_len": DEMO_CALIB_SEQ_LEN, "log": lambda m: None}
    api.quantize(api.QuantizeArgs(src, out, scheme=scheme, workers=1, overwrite=True, **calib))


def run_demo(out: Path, opts: VerifyOptions, echo: Callable[[str], None] = print,
             variants: tuple[Variant, ...] = VARIANTS) -> list[tuple[str, float | None, dict]]:
    ref = bundled_model("v3")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 2 * len(variants)
    step = 0
    for v in variants:
        step += 1
        echo(f"[{step}/{n}] quantize {ref.name} -> {v.label}: {out / v.dirname}")
        quantize_variant(ref, out / v.dirname, v.scheme, v.method)
    ref_logits = out / "ref-logits.safetensors"
    if ref_logits.exists():
        ref_logits.unlink()
    rows: list[tuple[str, float | None, dict]] = [("reference (FP8 release)", artifact_bytes(ref), None)]
    for i, v in enumerate(variants):
        step += 1
        echo(f"[{step}/{n}] verify {v.label} against the FP8 release"
             + (" (reference pass cached)" if i == 0 else " (cached reference logits)"))
        r = verify(ref, out / v.dirname, opts=opts if i == 0 else None, data=DEFAULT_DATA,
                   save_ref=ref_logits if i == 0 else None, ref_cache=ref_logits if i > 0 else None)
        (out / f"verify-{v.dirname}.json").write_text(json.dumps(json_report(r), indent=2))
        rows.append((v.label, artifact_bytes(out / v.dirname), r))
    return rows


def format_demo(out: Path, rows: list[tuple[str, float | None, dict]]) -> str:
    ref_label, ref_size, _ = rows[0]
    first = rows[1][2]
    s = first["settings"]
    lines = [
        "",
        f"bundled model {bundled_model('v3')} ({ref_size / 1e6:.2f} MB FP8 release, trained on Python stdlib text)",
        f"scored {s['scored_tokens']} held-out tokens in {s['windows']} windows of {s['ctx']}; "
        f"reference perplexity {first['ppl']['ref']:.3f}, {first['reference']['decode_tok_s']:.1f} decode tok/s",
        "",
        format_comparison([(label, size, r) for label, size, r in rows[1:]]),
        "",
        "files:",
    ]
    w = max(len(label) for label, _, _ in rows)
    for label, _, r in rows[1:]:
        p = Path(r["artifact"]["path"])
        lines.append(f"  {label:{w}s} {p}  (report {out / ('verify-' + p.name + '.json')})")
    lines.append(f"  {'reference logits':{w}s} {out / 'ref-logits.safetensors'}")
    lines += next_steps(out, Path(rows[1][2]["artifact"]["path"]))
    return "\n".join(lines)


def next_steps(out: Path, artifact: Path) -> list[str]:
    """Commands to try next, with the demo's real paths; ``--plot`` only where it can run (matplotlib is
    in the ``plot`` extra, not the base install), else how to get it."""
    import importlib.util
    ref = bundled_model("v3")
    verify = f"v4convert verify {ref} {artifact} --ref-logits {out / 'ref-logits.safetensors'}"
    if importlib.util.find_spec("matplotlib") is not None:
        verify += f" --plot {out / 'plot.png'}"
        extra = []
    else:
        extra = ["      (for a --plot PNG: pip install 'v4convert[plot]' — or pip install matplotlib — first)"]
    return ["next:", f"  {verify}", *extra, f"  v4convert run {artifact} --prompt 'def '",
            f"  v4convert export {artifact} --gguf --out {out / 'demo.gguf'}"]
