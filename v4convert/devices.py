"""``--device`` values checked once, before any work: a device this machine lacks is a user error."""
from __future__ import annotations

import torch

from .errors import UserError


class DeviceError(UserError):
    """A ``--device`` this machine cannot provide."""


def check_device(name: str) -> str:
    """Return ``name`` if torch can compute on it here; otherwise raise one line saying why."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}); "
                              f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {name}: unsupported device type {dev.type!r} (use cpu or cuda)")
    return name
