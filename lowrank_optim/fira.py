"""Fira: full-rank updates at GaLore's memory (Chen et al., 2024, arXiv:2410.01623).

Also the pieces APOLLO shares with it: the channel-wise norm ratio of a low-rank update
to its low-rank gradient (:func:`channel_ratio`) and the norm-growth limiter
(:func:`limit_growth`), whose one float of state per matrix is declared by
:class:`ScaledResidualMixin`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from . import rules
from ._base import LowRankOptimizer
from ._checks import check
from .galore import _galore_defaults
from .projector import LEFT, Projector

__all__ = ["FiraAdamW", "channel_ratio", "limit_growth"]

RATIO_EPS = 1e-8  # added to the gradient norms of the ratios (the Fira reference's value)


def channel_ratio(d: Tensor, low: Tensor, side: Optional[int]) -> Tensor:
    r"""Norm ratio :math:`\|d_{:,j}\| / (\|R_{:,j}\| + \epsilon)` of a low-rank update
    ``d`` to the low-rank gradient ``low`` (``R``), per channel: the columns of an
    :math:`r \times n` ``R`` (``side`` LEFT), the rows of an :math:`m \times r` one
    (RIGHT), shaped to broadcast against the full :math:`m \times n` gradient; with
    ``side=None`` one ratio for the whole tensor (a 0-d tensor). Float32."""
    if side is None:
        return torch.linalg.vector_norm(d) / (torch.linalg.vector_norm(low, dtype=torch.float32)
                                              + RATIO_EPS)
    dim = 0 if side == LEFT else 1
    return torch.linalg.vector_norm(d, dim=dim, keepdim=True) / (
        torch.linalg.vector_norm(low, dim=dim, keepdim=True, dtype=torch.float32) + RATIO_EPS)


def limit_growth(state: dict, norm: Tensor, gamma: Optional[float]) -> Tensor:
    r"""The norm-growth limiter (Fira; also APOLLO's): the factor :math:`c` (a 0-d
    tensor) that makes the update :math:`U_t` of norm ``norm`` grow at most by
    :math:`\gamma` per step, :math:`c = \min(1, \gamma \|U_{t-1}\| / \|U_t\|)`, with
    :math:`\|U_{t-1}\|` the previous *limited* norm, kept in ``state["limiter_norm"]``
    (replaced by :math:`c\,\|U_t\|`). No limit on the first step, after a zero update
    (a zero previous norm would freeze every later update), or with ``gamma=None``.
    Tensor arithmetic only: no device synchronisation."""
    prev = state.get("limiter_norm")
    c = torch.ones((), device=norm.device)
    if gamma is not None and prev is not None:
        cap = gamma * prev
        c = torch.where((prev > 0) & (norm > cap), cap / norm, c)
    state["limiter_norm"] = (c * norm).float()
    return c


class ScaledResidualMixin:
    """State declaration and checks shared by Fira and APOLLO: one float32
    ``limiter_norm`` per projected matrix (always kept, so the state's layout does not
    depend on ``norm_growth_limit``), a one-sided projection (channels are the
    dimension that is not compressed), and the limiter's ``gamma``."""

    needs_full_grad = True

    def _validate_group(self, g: dict) -> None:
        super()._validate_group(g)
        gamma = g["norm_growth_limit"]
        check(gamma is None or (isinstance(gamma, (int, float)) and gamma >= 1.0),
              "norm_growth_limit", gamma, "None (no limiter) or a float >= 1")
        if g.get("rank") is not None:
            check(g["proj_type"] != "full", "proj_type", g["proj_type"],
                  f"a one-sided projection for {type(self).__name__} (its scaling is per "
                  "channel of the dimension that is not compressed): 'std', "
                  "'reverse_std', 'left' or 'right'")

    def _declared_state(self, p, group, side):
        out = super()._declared_state(p, group, side)
        if side is not None:
            out["limiter_norm"] = torch.empty((), device="meta")
        return out


class FiraAdamW(ScaledResidualMixin, LowRankOptimizer):
    rule = rules.Adam()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: Optional[int] = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 norm_growth_limit: Optional[float] = 1.01, svd: str = "exact",
                 state_on_refresh: str = "project", stagger: bool = True, *,
                 maximize: bool = False):
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, betas=betas, eps=eps, norm_growth_limit=norm_growth_limit))

    def _put_back_(self, w: Tensor, d: Tensor, group: dict, state: dict,
                   proj: Optional[Projector], g: Optional[Tensor],
                   low: Optional[Tensor] = None) -> None:
        super()._put_back_(w, d, group, state, proj, g, low)  # decay, then -lr·scale·back(d)
        if proj is None:
            return
        residual = proj.project_back(state, low, g).neg_().add_(g)  # g − P Pᵀ g
        residual.mul_(channel_ratio(d, low, state["proj_side"]))
        residual.mul_(limit_growth(state, torch.linalg.vector_norm(residual),
                                   group["norm_growth_limit"]))
        F.add_(w, residual, alpha=-group["lr"])


FiraAdamW.__doc__ = r"""Fira: :class:`GaLoreAdamW` plus the gradient outside the subspace, scaled.

GaLore updates only the :math:`r`-dimensional subspace of each gradient. Fira adds the
rest of the gradient, the residual :math:`G_t - P P^\top G_t`, scaled per channel by the
norm ratio that Adam gave the low-rank part, so every update is full-rank while the state
stays GaLore's (glossary: :math:`\eta` = ``lr``, :math:`\alpha` = ``scale``,
:math:`\gamma` = ``norm_growth_limit``, :math:`\lambda` = ``weight_decay``; one side,
say :math:`R_t = P^\top G_t`, :math:`r \times n`, channels :math:`j` = columns):

.. math::
    \begin{aligned}
    &R_t = \mathrm{project}(G_t), \quad N_t = \mathrm{Adam}(R_t)
        \quad \text{(as GaLoreAdamW, bias-corrected)} \\
    &\phi_j = \frac{\|N_t[:, j]\|}{\|R_t[:, j]\| + 10^{-8}}, \quad
     S_t = (G_t - \mathrm{project\_back}(R_t))\,\mathrm{diag}(\phi) \\
    &\textbf{if } \|S_t\| > \gamma \|S_{t-1}\|:\ S_t \leftarrow S_t \cdot
        \gamma\|S_{t-1}\| / \|S_t\| \quad \text{(norm-growth limiter)} \\
    &W_t = (1 - \eta\lambda)\,W_{t-1} - \eta\,\big(\alpha\,\mathrm{project\_back}(N_t)
        + S_t\big)
    \end{aligned}

With the basis on the right (:math:`R_t = G_t Q`, :math:`m \times r`) the channels are
the :math:`m` rows. State: GaLoreAdamW's, plus one float (``limiter_norm``,
:math:`\|S_{t-1}\|`, after limiting) per projected matrix. The limiter skips the first
step and any step after a zero residual. Parameters that are not projected are plain
AdamW.

Differences from the authors' code (github.com/xichen-fy/Fira), each deliberate: the
residual is :math:`G - PP^\top G` as in the paper (the code subtracts
:math:`\alpha PP^\top G`, which keeps :math:`1-\alpha` of the projected part in the
"residual"); the limiter sees the residual with Adam's bias correction already in
(the code limits it before the step size); weight decay comes before the update, as in
``torch.optim.AdamW``. Cost: one more product :math:`P^\top G` and one more
back-projection per step than GaLore, and a full-size float32 temporary.

Args:
    params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, svd,
    state_on_refresh, stagger, maximize: as :class:`GaLoreAdamW` (the authors use
    lr 0.01 and scale 0.25 for LLaMA pretraining, as GaLore).
    proj_type (str): as :class:`GaLoreAdamW`, one-sided only (not ``"full"``).
    norm_growth_limit (float or None): :math:`\gamma \ge 1`, default 1.01 (the paper);
        ``None`` turns the limiter off.

Example:
    >>> import torch, lowrank_optim as lo
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> opt = lo.FiraAdamW(model.parameters(), lr=1e-2, rank=4)
    >>> model(torch.randn(16, 32)).square().mean().backward(); opt.step(); opt.zero_grad()

Reference: X. Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under
Low-rank Constraint?", 2024, https://arxiv.org/abs/2410.01623.
"""
