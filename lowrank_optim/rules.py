r"""Inner update rules as objects: what runs on the (low-rank or full) gradient.

A rule owns everything about its optimizer state and nothing about projection, learning
rate or weight decay (the base optimizer applies those in full space; optax's
``scale_by_galore(base_optimizer)`` idea). A rule is stateless; its hyperparameters are
read from the param group, so per-group values work. The interface:

* ``validate(group)``: raise ``ValueError`` naming a bad hyperparameter of the rule;
* ``init(state, like, group)``: create zero state for a gradient shaped like ``like``;
* ``update(state, g, step, group, low_rank) -> d``: update the state with ``g`` (step
  ``step`` >= 1) and return the float32 direction ``d`` (the update is :math:`-\eta d`);
  ``low_rank`` says whether ``g`` is a projected gradient (Adam then uses the GaLore
  reference's ε placement);
* ``shapes(shape, group) -> {key: shape}``: the state tensors' shapes for a gradient of
  ``shape`` (checked by ``load_state_dict``);
* ``transport_(state, move)``: the moments after a basis change; ``move(value, squared)``
  rotates a float32 moment into the new basis (``squared=True`` for a second moment,
  which must stay non-negative). Used by ``state_on_refresh="project"``.

The math is in :mod:`lowrank_optim.functional`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import functional as F
from . import fsdp
from ._checks import check, check_int

__all__ = ["Rule", "Adam", "Adam8bit", "Adafactor"]


class Rule:
    """Base of the inner rules; ``MOMENTS`` names the float moments that follow a basis
    change (the first rotated linearly, the rest with the squared rotation)."""

    MOMENTS: tuple = ()

    def validate(self, group: dict) -> None:
        pass

    def init(self, state: dict, like: Tensor, group: dict) -> None:
        raise NotImplementedError

    def update(self, state: dict, g: Tensor, step: int, group: dict, low_rank: bool) -> Tensor:
        raise NotImplementedError

    def shapes(self, shape: tuple, group: dict) -> dict:
        return {name: shape for name in self.MOMENTS}

    def transport_(self, state: dict, move: Callable[[Tensor, bool], Tensor]) -> None:
        for k, name in enumerate(self.MOMENTS):
            if self.has(state, name):
                self.set(state, name, move(self.get(state, name), k > 0))

    # the moments as float tensors (a quantized rule stores them otherwise)
    def has(self, state: dict, name: str) -> bool:
        return name in state

    def get(self, state: dict, name: str) -> Tensor:
        return state[name]

    def set(self, state: dict, name: str, value: Tensor) -> None:
        state[name] = value.to(state[name].dtype)


class Adam(Rule):
    """Adam with bias correction (``betas``, ``eps``): :func:`functional.adam_`. Moments
    of a plain parameter have its dtype and layout (as ``torch.optim.AdamW``); low-rank
    ones are float32 (they are small)."""

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def init(self, state, like, group):
        for name in self.MOMENTS:
            state[name] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def update(self, state, g, step, group, low_rank):
        b1, b2 = group["betas"]
        return F.adam_(g, state["exp_avg"], state["exp_avg_sq"], step, b1, b2, group["eps"],
                       hf_eps=low_rank)


class Adam8bit(Adam):
    """:class:`Adam` with both moments as 8-bit blockwise codes (``exp_avg_codes``,
    ``exp_avg_absmax``, ...) for tensors of at least ``min_8bit_size`` elements;
    smaller ones keep :class:`Adam`'s float moments, as bitsandbytes does."""

    def validate(self, group):
        check_int("min_8bit_size", group["min_8bit_size"], 0)

    def init(self, state, like, group):
        if fsdp.global_numel(like) >= group["min_8bit_size"]:  # a shard: the whole tensor's
            F.init_adam8bit(state, like)
        else:
            super().init(state, like, group)

    def update(self, state, g, step, group, low_rank):
        if "exp_avg_codes" not in state:
            return super().update(state, g, step, group, low_rank)
        b1, b2 = group["betas"]
        return F.adam8bit_(g, state, step, b1, b2, group["eps"])

    def shapes(self, shape, group):
        return {k: shape for k in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes")}

    def has(self, state, name):
        return name in state or f"{name}_codes" in state

    def get(self, state, name):
        return F.dequantize_adam8bit(state, name) if f"{name}_codes" in state else state[name]

    def set(self, state, name, value):
        if f"{name}_codes" in state:
            F.quantize_adam8bit(state, name, value)
        else:
            super().set(state, name, value)


class Adafactor(Rule):
    """Adafactor (``beta1`` or None, ``eps``, ``clip_threshold``): :func:`functional.adafactor_`,
    a factored second moment for matrices; only the first moment follows a basis change."""

    MOMENTS = ("exp_avg",)

    def validate(self, group):
        beta1, clip = group["beta1"], group["clip_threshold"]
        check(beta1 is None or 0.0 <= beta1 < 1.0, "beta1", beta1, "None or 0 <= beta1 < 1")
        check(clip > 0, "clip_threshold", clip, "> 0")

    def init(self, state, like, group):
        F.init_adafactor(state, like, group["beta1"])

    def update(self, state, g, step, group, low_rank):
        return F.adafactor_(g, state, step, group["beta1"], group["eps"],
                            group["clip_threshold"], shard=fsdp.stepping())

    def shapes(self, shape, group):
        out = {"exp_avg": shape} if group.get("beta1") is not None else {}
        if len(shape) == 2:
            out.update(exp_avg_sq_row=(shape[0],), exp_avg_sq_col=(shape[1],))
        else:
            out["exp_avg_sq"] = shape
        return out
