"""APOLLO and APOLLO-Mini: AdamW-like scaling estimated in a random low-rank space
(Zhu et al., MLSys 2025, arXiv:2412.05270), written from the paper."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import rules
from ._base import LowRankOptimizer
from ._checks import check, check_int
from .fira import ScaledResidualMixin, channel_ratio, limit_growth
from .galore import _galore_defaults
from .projector import LEFT, RIGHT, Projector, choose_side

__all__ = ["APOLLOAdamW", "APOLLOAdamW8bit", "APOLLOMini", "RandomProjector", "SCALE_TYPES"]

SCALE_TYPES = ("channel", "tensor")
MINI_SCALE = math.sqrt(128)  # the paper's alpha for APOLLO-Mini


@dataclass(frozen=True)
class RandomProjector(Projector):
    r"""A Gaussian random projection, drawn again rather than stored: the basis of
    refresh :math:`k` is :math:`P \in \mathbb{R}^{d \times r}`, :math:`P_{ij} \sim
    \mathcal{N}(0, 1/r)` (so :math:`\mathbb{E}\|P^\top x\|^2 = \|x\|^2`), from a
    generator seeded with ``(seed, k)`` on the gradient's device. The state holds only
    ``proj_side``; :math:`k` is ``state["refresh_count"] - 1`` (the refresh policy's
    count), so a resumed run, and every DDP replica, draws the same :math:`P` (the same
    matrices on devices of one type: CPU and CUDA generators differ). Not orthonormal:
    :meth:`project` is what APOLLO needs; :meth:`transport` of moments is not defined."""

    seed: int = 0

    def _draw(self, state: dict, like: Tensor, k: int) -> Tensor:
        m, n = like.shape
        shape = (n if state["proj_side"] == RIGHT else m, min(self.rank, m, n))
        if like.device.type == "meta":
            return torch.empty(shape, device="meta")
        gen = torch.Generator(device=like.device).manual_seed(
            (self.seed * 1_000_003 + k) % 2 ** 63)
        return torch.randn(shape, generator=gen, device=like.device).div_(math.sqrt(shape[1]))

    def _store(self, state: dict, key: str, basis: Tensor) -> None:
        pass  # drawn again from its seed when used

    def basis_shapes(self, state: dict, shape) -> dict:
        return {}

    def bases(self, state: dict, like: Tensor):
        p = self._draw(state, like, state.get("refresh_count", 1) - 1)
        return (p, None) if state["proj_side"] == LEFT else (None, p)

    def refresh(self, state: dict, grad: Tensor, seed: int = 0,
                shards=None) -> Optional[tuple]:
        """Switch to the basis of refresh ``seed``; returns ``(P_oldᵀ P_new)`` on the side
        in use (``None`` the first time), so the base knows the basis changed. ``shards``
        is always None: APOLLO does not step FSDP2-sharded parameters (``supports_fsdp2``)."""
        if grad.dim() != 2:
            raise ValueError(f"The projector needs a 2-D gradient, got shape {tuple(grad.shape)}")
        if not self.has_basis(state):
            state["proj_side"] = choose_side(grad.shape, self.proj_type)
            return None
        old = self.bases(state, grad)
        new = self._draw(state, grad, seed)
        return tuple(None if o is None else o.T @ new for o in old)


class APOLLOAdamW(ScaledResidualMixin, LowRankOptimizer):
    rule = rules.Adam()
    _RULE_DEFAULTS: dict = {}  # the inner rule's options and their defaults

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: Optional[int] = 128,
                 update_proj_gap: int = 200, scale: float = 1.0, scale_type: str = "channel",
                 proj_type: str = "std", norm_growth_limit: Optional[float] = 1.01,
                 seed: int = 0, state_on_refresh: str = "keep", stagger: bool = False,
                 stochastic_round: bool = True, *, maximize: bool = False, **rule_options):
        unknown = sorted(set(rule_options) - set(self._RULE_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, "exact",
            state_on_refresh, stagger, maximize, betas=betas, eps=eps, scale_type=scale_type,
            norm_growth_limit=norm_growth_limit, seed=seed, stochastic_round=stochastic_round,
            **{**self._RULE_DEFAULTS, **rule_options}))

    def _validate_group(self, g: dict) -> None:
        super()._validate_group(g)
        check_int("seed", g["seed"], 0)
        check(g["scale_type"] in SCALE_TYPES, "scale_type", g["scale_type"],
              f"one of {SCALE_TYPES}")
        if g.get("rank") is not None:
            check(g["state_on_refresh"] != "project", "state_on_refresh",
                  g["state_on_refresh"], "'keep' or 'reset' (a random basis is not "
                  "orthonormal, so the moments cannot be rotated into the next one)")

    def _projector(self, group: dict) -> Projector:
        return RandomProjector(group["rank"], group["proj_type"], seed=group["seed"])

    def _put_back_(self, w: Tensor, d: Tensor, group: dict, state: dict,
                   proj: Optional[Projector], g: Optional[Tensor],
                   low: Optional[Tensor] = None) -> None:
        if proj is None:
            return super()._put_back_(w, d, group, state, proj, g, low)
        side = state["proj_side"]
        s = channel_ratio(d, low, side if group["scale_type"] == "channel" else None)
        if s.dim():  # ||G diag(s)||² = Σ_j s_j² ||G_j||², without forming G diag(s)
            norm = torch.linalg.vector_norm(
                s * torch.linalg.vector_norm(g, dim=0 if side == LEFT else 1, keepdim=True,
                                             dtype=torch.float32))
        else:
            norm = s * torch.linalg.vector_norm(g, dtype=torch.float32)
        s = s * limit_growth(state, norm, group["norm_growth_limit"])
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            w.mul_(1 - lr * wd)
        w.addcmul_(g, s, value=-lr * group["scale"])  # no full-size temporary


APOLLOAdamW.__doc__ = r"""APOLLO: AdamW's update approximated by a channel-wise scaling of the
raw gradient, estimated from Adam moments of a random rank-:math:`r` projection.

AdamW's update divides the gradient element-wise; APOLLO keeps the gradient's direction
within each channel and learns only one scaling factor per channel (``scale_type="channel"``)
or per matrix (``"tensor"``, APOLLO-Mini), estimated from Adam run on a random projection
(glossary: :math:`\eta` = ``lr``, :math:`\alpha` = ``scale``, :math:`r` = ``rank``,
:math:`T` = ``update_proj_gap``, :math:`\gamma` = ``norm_growth_limit``,
:math:`\lambda` = ``weight_decay``; one side, say the left, :math:`G_t \in
\mathbb{R}^{m\times n}`, channels :math:`j` = the :math:`n` columns):

.. math::
    \begin{aligned}
    &\textbf{if } t \in \{0, T, 2T, \dots\}:\ P \in \mathbb{R}^{m \times r},\
        P_{ij} \sim \mathcal{N}(0, 1/r) \text{ from the seed } (\text{seed}, t/T) \\
    &R_t = P^\top G_t \quad (r \times n), \qquad
        \tilde R_t = \mathrm{Adam}(R_t) = \frac{\hat M_t}{\sqrt{\hat V_t} + \epsilon} \\
    &s_j = \frac{\|\tilde R_t[:, j]\|}{\|R_t[:, j]\| + 10^{-8}} \ \text{(channel)}
        \quad\text{or}\quad s = \frac{\|\tilde R_t\|}{\|R_t\| + 10^{-8}} \
        \text{(tensor)}, \qquad \tilde G_t = G_t\,\mathrm{diag}(s) \\
    &\textbf{if } \|\tilde G_t\| > \gamma \|\tilde G_{t-1}\|:\ \tilde G_t \leftarrow
        \tilde G_t \cdot \gamma\|\tilde G_{t-1}\| / \|\tilde G_t\|
        \quad \text{(norm-growth limiter)} \\
    &W_t = (1 - \eta\lambda)\,W_{t-1} - \eta\,\alpha\,\tilde G_t
    \end{aligned}

``proj_type`` picks the side as in GaLore (``"std"``: compress the smaller dimension;
with the right side the channels are the :math:`m` rows). :math:`P` is drawn again from
its seed when used (:class:`RandomProjector`), so the state per projected matrix is the
two Adam moments of :math:`R_t` (:math:`2r\max(m,n)` floats for ``"std"``) and one float
for the limiter: for APOLLO-Mini (:math:`r = 1`) about :math:`2\max(m,n)` floats against
AdamW's :math:`2mn`. No SVD. Parameters that are not projected are plain AdamW.

Choices where the paper is silent, and why: the moments are kept across a new
projection (``state_on_refresh="keep"``; ``"reset"`` zeroes them; ``"project"`` is
refused, a random basis is not orthonormal); the basis seed depends on the group's
``seed`` and the refresh count, not on the layer, as the paper's "seed :math:`t`"; the
limiter skips the first step and any step after a zero update; ``stagger`` is off by
default (a random draw costs nothing to spread out). The scaling factors include Adam's
bias correction. :math:`\epsilon` in the ratio (:math:`10^{-8}`) is Fira's. Cost per step:
one product of :math:`G` with :math:`P` (the base's projection, handed to ``_put_back_``)
and a draw of :math:`P`; no full-size temporary. The param groups' ``svd`` entry
is unused (the base's checks want one).

* **APOLLO-Mini**: ``rank=1, scale_type="tensor", scale=sqrt(128)`` (the paper's
  :math:`\alpha = \sqrt{128}` makes up for the rank-1 estimate's smaller norm ratio),
  :class:`APOLLOMini`. ``scale`` here is :math:`\alpha` itself. Published configs
  elsewhere (Hugging Face ``optim_args``: APOLLO-Mini ``scale=128``, with the tip "set
  scale to n/r", against the paper's :math:`\sqrt{128}`) seem to follow another
  convention: ``scale=128`` here would be :math:`\sqrt{128}\times` the paper's
  :math:`\alpha`.
* **Choosing** :math:`\alpha`: with :math:`P_{ij} \sim \mathcal{N}(0, 1/r)`, the ratio
  :math:`s_j` is about :math:`\sqrt{r/d}` times Adam's own (:math:`d` the compressed
  dimension) for ``"channel"`` and :math:`\sqrt{1/d}` for rank-1 ``"tensor"``, so
  :math:`\alpha = \sqrt{d/r}` (resp. :math:`\sqrt{d}`) gives updates of Adam's size. The
  parameters that are not projected take ``lr`` alone, so :math:`\alpha` also sets the
  ratio of the two groups' effective rates and is worth tuning next to ``lr``.
* **8-bit moments**: :class:`APOLLOAdamW8bit`.
* **INT8 weights** (the paper's Q-APOLLO): :func:`lowrank_optim.quantize_weights` first;
  the weights are updated through their float32 value and stored back with stochastic
  rounding seeded by ``seed`` (``stochastic_round=False``: to nearest), as Q-GaLore.

Args:
    params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW``
        (``weight_decay`` defaults to 0). The paper pretrains LLaMA with lr 0.01.
    rank (int or None): :math:`r`. Default 128 (the paper: a quarter of the hidden
        size; 1 for APOLLO-Mini). ``None``: no projection, plain AdamW.
    update_proj_gap (int): :math:`T`, steps between new projections. Default 200.
    scale (float): :math:`\alpha`. Default 1 (APOLLO-Mini: :math:`\sqrt{128}`).
    scale_type (str): ``"channel"`` (default) or ``"tensor"``.
    proj_type (str): ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"``.
    norm_growth_limit (float or None): :math:`\gamma \ge 1`, default 1.01 (the paper);
        ``None`` turns the limiter off.
    seed (int): seeds the projections and the INT8 weights' rounding noise.
    state_on_refresh (str): ``"keep"`` (default) or ``"reset"``.
    stagger (bool): spread the matrices' new projections over one gap (GaLoreAdamW's).
    stochastic_round (bool): INT8 weights only, see above.

Example:
    >>> import torch, lowrank_optim as lo
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> opt = lo.APOLLOAdamW(model.parameters(), lr=1e-2, rank=4)
    >>> model(torch.randn(16, 32)).square().mean().backward(); opt.step(); opt.zero_grad()

Reference: H. Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025,
https://arxiv.org/abs/2412.05270.
"""


class APOLLOAdamW8bit(APOLLOAdamW):
    """:class:`APOLLOAdamW` with both low-rank Adam moments as 8-bit blockwise codes for
    tensors of at least ``min_8bit_size`` elements (keyword, default 4096;
    :class:`GaLoreAdamW8bit`'s rule); smaller ones keep float32 moments. An APOLLO-Mini
    moment has :math:`\\max(m,n)` elements: 8-bit from :math:`\\max(m,n) \\ge` ``min_8bit_size``.
    APOLLO-Mini with 8-bit moments: ``APOLLOAdamW8bit(params, rank=1, scale_type="tensor",
    scale=math.sqrt(128))``."""

    rule = rules.Adam8bit()
    _RULE_DEFAULTS = {"min_8bit_size": 4096}


class APOLLOMini(APOLLOAdamW):
    """APOLLO-Mini: :class:`APOLLOAdamW` with ``rank=1``, ``scale_type="tensor"`` and
    ``scale=sqrt(128)`` by default (one scaling factor per matrix from a rank-1
    projection: SGD-like memory)."""

    def __init__(self, params, lr: float = 1e-3, rank: Optional[int] = 1,
                 scale: float = MINI_SCALE, scale_type: str = "tensor", **kwargs):
        super().__init__(params, lr, rank=rank, scale=scale, scale_type=scale_type, **kwargs)
