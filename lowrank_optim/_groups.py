"""Param-group helpers: which parameters a low-rank method should project."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ._checks import check_int

__all__ = ["param_groups"]


def param_groups(model: torch.nn.Module, rank: int = 128,
                 target_modules: Optional[Iterable[str]] = ("attn", "mlp"),
                 **projected_options) -> list[dict]:
    """Two param groups in galore-torch's format: the weights of ``nn.Linear`` (and
    :class:`~lowrank_optim.nn.QuantLinear`) modules whose qualified name contains one of
    ``target_modules`` (all such layers when it is ``None``) get ``rank`` and ``projected_options`` (e.g. ``update_proj_gap``,
    ``scale``, ``proj_type``); every other trainable parameter (embeddings, output head,
    norms, biases) goes to a plain group. This is the papers' choice:
    ``target_modules=("attn", "mlp")`` on LLaMA. Empty groups are left out.
    """
    check_int("rank", rank)
    targets = None if target_modules is None else tuple(target_modules)
    if isinstance(target_modules, str):
        raise TypeError("target_modules must be an iterable of strings, not a string")
    from .nn import QuantLinear

    chosen = set()
    for name, module in model.named_modules():
        # a GaLoreLinear's weight trains through its weight_lowrank (lowrank_backward)
        weight = getattr(module, "weight_lowrank", getattr(module, "weight", None))
        if isinstance(module, (torch.nn.Linear, QuantLinear)) and weight.requires_grad \
                and (targets is None or any(t in name for t in targets)):
            chosen.add(weight)
    if not chosen:
        raise ValueError(f"No nn.Linear module name contains any of {targets!r}")
    projected = [p for p in model.parameters() if p in chosen]
    plain = [p for p in model.parameters() if p.requires_grad and p not in chosen]
    groups = [{"params": plain}] if plain else []
    return groups + [{"params": projected, "rank": rank, **projected_options}]
