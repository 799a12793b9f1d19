"""``verify --plot``: per-layer hidden-state error and the per-token KLD distribution, as a PNG (matplotlib)."""
from __future__ import annotations

from pathlib import Path

from . import VerifyError


def plot_report(r: dict, out: Path) -> None:
    """PNG with the per-layer hidden-state error and the per-token KLD distribution (needs matplotlib)."""
    plt = require_matplotlib()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    h = r["hidden"]
    if h["available"]:
        a1.bar(range(len(h["rel_err"])), h["rel_err"], color="tab:blue")
        a1.set_xticks(range(len(h["rel_err"])))
        a1.set_xlabel("layer")
        a1.set_ylabel("relative error ||h_art - h_ref|| / ||h_ref||")
    else:
        a1.text(0.5, 0.5, "hidden states n/a\n" + h["reason"], ha="center", va="center", transform=a1.transAxes)
    a1.set_title("per-layer hidden-state error")
    kld = r["_per_token_kld"].clamp(min=1e-9).numpy()
    import numpy as np
    a2.hist(kld, bins=np.logspace(-9, np.log10(max(float(kld.max()), 1e-8)) + 0.01, 40), color="tab:orange")
    a2.set_xscale("log")
    a2.set_xlabel("KL(ref || art) per token (nats, floored at 1e-9)")
    a2.set_ylabel("tokens")
    a2.axvline(r["kld"]["mean"] if r["kld"]["mean"] > 0 else 1e-9, color="k", ls="--", label="mean")
    a2.legend()
    a2.set_title(f"KLD distribution ({r['settings']['scored_tokens']} tokens)")
    fig.suptitle(f"{Path(r['artifact']['path']).name} vs {Path(r['reference']['path']).name}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


class PlotUnavailable(VerifyError):
    pass


def require_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'v4convert[plot]'") from None
    return plt
