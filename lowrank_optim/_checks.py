"""Argument and gradient checks shared by the package: each error names the bad value and
what is allowed."""
from __future__ import annotations

import numbers
import os
import sys
from typing import Optional

import torch
from torch import Tensor

__all__ = ["is_int", "check", "check_int", "plain", "nonfinite_", "all_finite", "user_stacklevel"]


def is_int(v) -> bool:
    """An integer that is not a ``bool``: a Python ``int`` or another ``numbers.Integral``
    (``numpy.int64``)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def plain(v):
    """``v`` with numpy (or other ``numbers``) scalars as Python ``int``/``float``, in
    tuples too, so that a param group holding them saves with ``weights_only`` loading."""
    if isinstance(v, (bool, str, Tensor)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, tuple):
        return tuple(plain(x) for x in v)
    return v


def check(cond: bool, name: str, value, allowed: str) -> None:
    """Raise ``ValueError("Invalid {name}: {value!r} (expected {allowed})")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")


def check_int(name: str, value, least: int = 1) -> None:
    """``value`` must be an int >= ``least`` (1: "a positive int")."""
    check(is_int(value) and value >= least, name, value,
          "a positive int" if least == 1 else f"an int >= {least}")


def nonfinite_(tensors: list, inv_scale: Optional[Tensor] = None) -> Tensor:
    """A float32 scalar, 1.0 when some element of ``tensors`` is NaN or Inf, else 0.0, on
    the first tensor's device, without a host sync; multiplies each tensor in place by
    ``inv_scale`` when given (a ``GradScaler``'s unscaling). One fused pass per device and
    dtype: ``torch._amp_foreach_non_finite_check_and_unscale_``, GradScaler's own kernel,
    the cheapest check measured (``docs/decisions.md``, Non-finite gradients)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    found = []
    for (device, _), ts in groups.items():
        f = torch.zeros((), device=device)
        inv = torch.ones((), device=device) if inv_scale is None else inv_scale.to(device)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, f, inv)
        found.append(f)
    if len(found) <= 1:
        return found[0] if found else torch.zeros(())
    return torch.stack([f.to(found[0].device) for f in found]).amax()


def all_finite(tensors: list) -> bool:
    """Whether every element of every tensor is finite (:func:`nonfinite_`, one host sync)."""
    return not nonfinite_(tensors).item()


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function that calls this, of the first
    frame outside torch and this package: the user's line (``opt.step()``, wrapped by
    torch; ``loss.backward()``, whose end-of-backward callbacks run inside autograd)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
