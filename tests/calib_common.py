"""What the calibration test modules share: the calibration text and the linears a pass records."""
from __future__ import annotations

from pathlib import Path

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Role

TEXT = "def f(x):\n    return [x + i for i in range(10)]\n" * 200     # 2,400 code-like tokens and more


def linears(ck_path: Path) -> list[str]:
    """Every 2-D linear weight of ``ck_path`` but the router and the head (what a calibration pass may record)."""
    with Checkpoint.open(ck_path) as ck:
        return [i.name for i in ck.infos() if i.role.is_linear and len(i.shape) == 2
                and i.role not in (Role.ROUTER, Role.HEAD)]
