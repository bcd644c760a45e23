"""Q-GaLore: quantized GaLore (Zhang et al., 2024, arXiv:2407.08296)."""
from __future__ import annotations

from typing import Optional

from . import rules
from ._base import LowRankOptimizer
from .galore import _galore_defaults
from .projector import Projector
from .refresh import LazyCosine

__all__ = ["QGaLoreAdamW8bit"]


class QGaLoreAdamW8bit(LowRankOptimizer):
    rule = rules.Adam8bit()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: Optional[int] = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 proj_bits: Optional[int] = 4, proj_group_size: int = 256,
                 cos_threshold: float = 0.4, gamma_proj: float = 2, queue_size: int = 5,
                 stochastic_round: bool = True, seed: int = 0, svd: str = "exact",
                 state_on_refresh: str = "project", stagger: bool = True,
                 min_8bit_size: int = 4096, *, maximize: bool = False):
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, betas=betas, eps=eps, min_8bit_size=min_8bit_size,
            proj_bits=proj_bits, proj_group_size=proj_group_size, cos_threshold=cos_threshold,
            gamma_proj=gamma_proj, queue_size=queue_size, stochastic_round=stochastic_round,
            seed=seed))

    def _validate_group(self, g: dict) -> None:
        super()._validate_group(g)
        if not isinstance(g["seed"], int) or isinstance(g["seed"], bool) or g["seed"] < 0:
            raise ValueError(f"Invalid seed: {g['seed']!r} (expected an int >= 0)")
        if g.get("rank") is not None:
            self._projector(g)
            LazyCosine(g["update_proj_gap"], 0, threshold=g["cos_threshold"],
                       queue_size=g["queue_size"], growth=g["gamma_proj"])

    def _projector(self, group: dict) -> Projector:
        return Projector(group["rank"], group["proj_type"], group["svd"],
                         quant_bits=group["proj_bits"], quant_group_size=group["proj_group_size"])

    def _refresh_policy(self, p, group: dict):
        return LazyCosine(group["update_proj_gap"], self._phase(p, group),
                          threshold=group["cos_threshold"], queue_size=group["queue_size"],
                          growth=group["gamma_proj"])

    def _expected_shapes(self, p, group, st):
        shapes = super()._expected_shapes(p, group, st)
        if "proj_codes" in st and group.get("proj_bits") is not None:
            # the packed INT4 basis: rows × min(rank, m, n) codes, two per byte
            m, n = p.shape
            rows = n if st["proj_side"] == 1 else m
            numel = rows * min(group["rank"], m, n)
            shapes["proj_codes"] = ((numel + 1) // 2 if group["proj_bits"] <= 4 else numel,)
        return shapes


QGaLoreAdamW8bit.__doc__ = r"""Q-GaLore: GaLore with quantized weights, projections and moments.

Q-GaLore keeps GaLore's update (see :class:`GaLoreAdamW`; glossary: :math:`\eta` = ``lr``,
:math:`\alpha` = ``scale``, :math:`r` = ``rank``, :math:`T` = ``update_proj_gap``) and
quantizes everything that is large:

.. math::
    \begin{aligned}
    &\textbf{if refresh due}: P \leftarrow \mathrm{Q}_4(\text{top-}r\text{ SVD of } G_t),
      \quad s = \|P_{old}^\top P_{new}\|_F^2 / r \\
    &\quad \text{queue} \leftarrow \text{last } k \text{ values of } s;\ \
      \textbf{if } |\text{queue}| = k \wedge \overline{\text{queue}} \ge \tau:
      T_\ell \leftarrow \gamma\,T_\ell \\
    &R_t = \mathrm{project}(G_t;\ \mathrm{deq}(P)),\quad N_t = \mathrm{Adam8bit}(R_t) \\
    &\hat W = \mathrm{deq}(W_t^{int8}) \cdot (1-\eta\lambda) - \eta\,\alpha\,
      \mathrm{project\_back}(N_t) \\
    &W_{t+1}^{int8} = \mathrm{SR}\big(\hat W / s_g\big) \quad
      (\text{stochastic rounding, fresh per-group min-max ranges})
    \end{aligned}

* **INT8 weights** come from :func:`lowrank_optim.quantize_weights`, which swaps Linear
  layers for :class:`~lowrank_optim.nn.QuantLinear` (uint8 codes, per-group scales, no
  float master copy). Stochastic rounding (:math:`\mathbb{E}[\mathrm{SR}(x)] = x`) keeps
  updates smaller than one quantization step on average; ``stochastic_round=False``
  rounds to nearest. Unquantized parameters (embeddings, norms, head, biases) are
  updated as by :class:`GaLoreAdamW8bit`.
* **INT4 projection**: the basis is stored as ``proj_bits``-bit asymmetric min-max codes
  in groups of ``proj_group_size`` (packed two per byte), quantized once per refresh and
  dequantized on use. ``proj_bits=None`` keeps it float32.
* **Lazy layer-wise refresh** (:class:`~lowrank_optim.refresh.LazyCosine`): after each
  SVD the similarity :math:`s` of the new subspace to the previous one is recorded;
  when the last ``queue_size`` values average at least ``cos_threshold``, that matrix's
  gap is multiplied by ``gamma_proj``. Similarity here is the subspace overlap
  :math:`\|P_{old}^\top P_{new}\|_F^2/r \in [0, 1]` over all :math:`r` directions, which
  is insensitive to the arbitrary signs and order of singular vectors; the reference
  uses the signed cosine of the first singular vector only. ``gamma_proj=1`` turns
  laziness off.
* **8-bit moments**: blockwise 8-bit Adam states as in :class:`GaLoreAdamW8bit`.

With an unquantized model, ``proj_bits=None``, ``gamma_proj=1`` and a ``min_8bit_size``
larger than every state, this optimizer is :class:`GaLoreAdamW`.

Args:
    params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type, svd,
    state_on_refresh, stagger, min_8bit_size, maximize: as :class:`GaLoreAdamW8bit`.
    proj_bits (int or None): bits of the stored basis. Default 4.
    proj_group_size (int): elements per scale of the basis. Default 256.
    cos_threshold (float): :math:`\tau`, in [0, 1]. Default 0.4.
    gamma_proj (float): :math:`\gamma \ge 1`, gap growth. Default 2.
    queue_size (int): :math:`k`. Default 5.
    stochastic_round (bool): SR (default) or round-to-nearest for INT8 weights.
    seed (int): seed of the rounding noise (with the parameter's index and step).

Example:
    >>> import torch, lowrank_optim as lo
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    >>> model = lo.quantize_weights(model, bits=8, group_size=256, target_modules=None)
    >>> opt = lo.QGaLoreAdamW8bit(model.parameters(), lr=1e-2, rank=16)
    >>> model(torch.randn(4, 64)).square().mean().backward(); opt.step(); opt.zero_grad()

Reference: Z. Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
Layer-Adaptive Low-Rank Gradients", 2024, https://arxiv.org/abs/2407.08296. Reference
learning rates: 0.015 (60M/130M), 0.01 (350M/1B), 0.004 (7B).
"""
