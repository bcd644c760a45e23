"""GaLore around any ``torch.optim`` / ``torch_optimizer`` optimizer (optax's
``scale_by_galore(base_optimizer)``, for PyTorch)."""
from __future__ import annotations

from typing import Optional

from ._base import LowRankOptimizer
from .galore import _galore_defaults
from .rules import TorchRule

__all__ = ["GaLore"]


class GaLore(LowRankOptimizer):
    r"""GaLore's projection with any ``torch.optim`` or ``torch_optimizer`` class as the
    optimizer in the low-rank space.

    Each projected matrix's gradient :math:`G_t` is projected (:math:`R_t =
    \mathrm{project}(G_t)`, the basis from its SVD every ``update_proj_gap`` steps, as
    :class:`GaLoreAdamW`), ``optimizer``'s own update runs on :math:`R_t` with its state
    in the low-rank shape, and the update is projected back:

    .. math::
        W_t = (1 - \eta\lambda)\,W_{t-1} - \eta\,\alpha\,
            \mathrm{project\_back}\big(\mathrm{step}_{\text{optimizer}, lr=1}(R_t)\big)

    (:class:`~lowrank_optim.rules.TorchRule`: the wrapped optimizer runs with ``lr=1``
    and ``weight_decay=0``; :math:`\eta` = ``lr``, the decoupled :math:`\lambda` =
    ``weight_decay`` and ``maximize`` are this optimizer's, in full space, so LR
    schedulers and param groups work as usual). Parameters that are not projected get
    ``optimizer``'s update on their full gradient. ``optimizer``'s other arguments
    (``betas``, ``eps``, ``momentum``, ...) are keyword arguments here, with its own
    defaults, and may be set per param group. With ``torch.optim.Adam`` this is
    :class:`GaLoreAdamW` with torch's ε placement.

    Refused with the reason (``ValueError``): optimizers whose update needs the
    parameter's own values or norms (LAMB's and LARS's trust ratios, Shampoo's
    full-matrix preconditioners, Lookahead/Ranger's slow weights, MADGRAD, AdamP) or
    whose ``lr`` is not a plain multiplier (Rprop, AdaBound); see
    :data:`lowrank_optim.rules.DENIED` and the probe in ``TorchRule``.

    Args:
        params: parameters or param groups.
        optimizer (type): a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.RAdam``,
            ``torch_optimizer.Yogi``, ``torch_optimizer.AdaBelief``.
        lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, stagger, maximize:
            as :class:`GaLoreAdamW`.
        state_on_refresh (str): as :class:`GaLoreAdamW`; ``"project"`` (default) needs a
            state of known moments (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...).
        **options: ``optimizer``'s own arguments.

    Example:
        >>> import torch, lowrank_optim as lo
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> opt = lo.GaLore(model.parameters(), torch.optim.RAdam, lr=1e-2, rank=4, betas=(0.9, 0.99))
        >>> model(torch.randn(16, 32)).square().mean().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, optimizer: type, lr: float = 1e-3, weight_decay: float = 0.0,
                 rank: Optional[int] = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", svd: str = "exact", state_on_refresh: str = "project",
                 stagger: bool = True, *, maximize: bool = False, **options):
        self.rule = TorchRule(optimizer)
        unknown = sorted(set(options) - set(self.rule.options))
        if unknown:
            raise TypeError(f"GaLore({optimizer.__name__}) got unexpected keyword arguments "
                            f"{unknown}; {optimizer.__name__}'s options: "
                            f"{sorted(self.rule.options)}")
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, **{**self.rule.options, **options}))

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "rule": self.rule}  # the rule is per instance
