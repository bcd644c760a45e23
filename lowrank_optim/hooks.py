"""Per-layer updates fused into backward, for any optimizer of this package.

``handle = opt.register_hooks(model)`` registers, on every parameter of ``model`` that
``opt`` optimizes, a ``Tensor.register_post_accumulate_grad_hook``. When a parameter's
gradient is complete, the hook updates that parameter with ``opt.step_param(p, group)``
and frees its gradient (``p.grad = None``). Integer-coded weights
(:class:`~lowrank_optim.nn.QuantLinear`) cannot carry autograd hooks; their backward calls
the same hook after writing ``p.quant_grad``. Only one layer's gradient is alive at a
time, so peak memory drops by roughly the total gradient size minus the largest
parameter's. It stays one optimizer: ``state_dict``/``load_state_dict``, param groups and
LR schedulers (``scheduler.step()`` once per optimizer step) work unchanged, and a stray
``opt.step()`` is a harmless no-op because the gradients are already gone.

Options:

* ``accumulation_steps=N``: gradients accumulate over N backward passes and each
  parameter is stepped on the N-th (scale the loss by 1/N as usual). The gradients are
  then kept between micro-batches, so memory is saved only on the last one.
* ``max_grad_norm_per_param=c``: each parameter's gradient is clipped to norm ``c``
  before its update (``torch.nn.utils.clip_grad_norm_`` on that parameter alone).

What cannot work in this mode raises instead of silently doing nothing:

* global gradient-norm clipping (the total norm is known only when every gradient has
  been produced, and by then most have been applied): ``max_grad_norm=`` raises
  ``ValueError``, pointing to ``max_grad_norm_per_param``. A call of
  ``torch.nn.utils.clip_grad_norm_`` after backward sees no gradients and does nothing.
* ``opt.step(closure)`` raises ``RuntimeError``.

``handle.remove()`` restores normal stepping. ``copy.deepcopy(model)`` does not copy
the hooks (a PyTorch property); register them on the copy.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["register_hooks", "HooksHandle"]


class _AttrHandle:
    """Removable handle for the hook attribute of an integer-coded weight."""

    def __init__(self, p):
        self.p = p

    def remove(self) -> None:
        self.p.__dict__.pop("lowrank_hook", None)


class HooksHandle:
    """What :func:`register_hooks` returns; ``remove()`` undoes it."""

    def __init__(self, optimizer, handles: list, counts: dict):
        self.optimizer, self._handles, self.counts = optimizer, handles, counts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.optimizer._hooks is self:
            self.optimizer._hooks = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def register_hooks(optimizer, model: torch.nn.Module, accumulation_steps: int = 1,
                   max_grad_norm_per_param: Optional[float] = None,
                   max_grad_norm: Optional[float] = None) -> HooksHandle:
    """Step each parameter of ``model`` in backward, as soon as its gradient is ready."""
    if max_grad_norm is not None:
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r}: global gradient-norm clipping cannot work in "
            "per-layer mode (parameters are updated before the total norm is known); use "
            "max_grad_norm_per_param, or normal stepping")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} "
                         "(expected an int >= 1)")
    if max_grad_norm_per_param is not None and not max_grad_norm_per_param > 0:
        raise ValueError(f"Invalid max_grad_norm_per_param: {max_grad_norm_per_param!r} "
                         "(expected > 0)")
    if optimizer._hooks is not None:
        raise RuntimeError("register_hooks was already called on this optimizer; "
                           "call handle.remove() first")
    # group index, not the dict: load_state_dict replaces the group dicts
    group_of = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    params = [p for p in model.parameters() if p in group_of]
    if not params:
        raise ValueError("None of the model's parameters is optimized by this optimizer")
    counts = {}

    def hook(p: torch.Tensor) -> None:
        n = counts.get(p, 0) + 1
        if n < accumulation_steps:
            counts[p] = n
            return
        counts.pop(p, None)
        if max_grad_norm_per_param is not None:
            g = optimizer._raw_grad(p)  # clip_grad_norm_'s rule, on this gradient alone
            coef = max_grad_norm_per_param / (torch.linalg.vector_norm(g.float()) + 1e-6)
            g.mul_(coef.clamp(max=1.0).to(g.dtype))
        optimizer.step_param(p, optimizer.param_groups[group_of[p]])
        p.grad = None
        if hasattr(p, "quant_grad"):
            p.quant_grad = None
        # what torch's LR-scheduler wrapper of opt.step() records: without it the first
        # scheduler.step() warns, wrongly here, that it was called before optimizer.step()
        optimizer._opt_called = True

    handles = []
    for p in params:
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(hook))
        elif not p.is_floating_point():  # QuantLinear codes: their backward calls the hook
            p.lowrank_hook = hook
            handles.append(_AttrHandle(p))
    optimizer._hooks = HooksHandle(optimizer, handles, counts)
    return optimizer._hooks
