"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024, arXiv:2403.03507)."""
from __future__ import annotations

from typing import Optional

from . import rules
from ._base import LowRankOptimizer

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"]


def _galore_defaults(lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd,
                     state_on_refresh, stagger, maximize, **inner) -> dict:
    return dict(lr=lr, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                scale=scale, proj_type=proj_type, svd=svd, state_on_refresh=state_on_refresh,
                stagger=stagger, maximize=maximize, **inner)


class GaLoreAdamW(LowRankOptimizer):
    rule = rules.Adam()
    supports_fsdp2 = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: Optional[int] = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 svd: str = "exact", state_on_refresh: str = "project", stagger: bool = True,
                 *, maximize: bool = False):
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, betas=betas, eps=eps))


GaLoreAdamW.__doc__ = r"""AdamW with GaLore gradient projection; a drop-in ``torch.optim.AdamW``.

For each projected matrix :math:`W \in \mathbb{R}^{m\times n}` with gradient
:math:`G_t` (glossary: :math:`\eta` = ``lr``, :math:`\alpha` = ``scale``,
:math:`r` = ``rank``, :math:`T` = ``update_proj_gap``, :math:`\lambda` = ``weight_decay``):

.. math::
    \begin{aligned}
    &\textbf{if } t \in \{0, T, 2T, \dots\}:\ P_t \leftarrow \text{top-}r
        \text{ singular vectors of } G_t \text{ (side by ``proj\_type``)} \\
    &R_t = \mathrm{project}(G_t) \quad (P^\top G \text{ or } G Q;\ r \times n \text{ or } m \times r) \\
    &M_t = \beta_1 M_{t-1} + (1-\beta_1) R_t, \quad
     V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2 \\
    &N_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\cdot\frac{M_t}{\sqrt{V_t}+\epsilon} \\
    &W_t = (1 - \eta\lambda)\,W_{t-1} - \eta\,\alpha\,\mathrm{project\_back}(N_t)
    \end{aligned}

Optimizer state per projected matrix: two float32 moments of :math:`\max(m,n)\times r`
(``proj_type="std"``) plus the float32 basis of :math:`\min(m,n)\times r`, against
AdamW's :math:`2mn`. Parameters that are not projected follow ``torch.optim.AdamW``
exactly (same ε placement, :math:`\hat m / (\sqrt{\hat v} + \epsilon)`).

Which parameters are projected: with plain parameters (``model.parameters()``), every
2-D parameter; with param groups in galore-torch's format, where some group names
``rank``, only the 2-D parameters of those groups, and groups without ``rank`` are plain
AdamW (``rank=None`` says the same explicitly). 1-D and >2-D parameters are never
projected. :func:`lowrank_optim.param_groups` builds the papers' choice (attention and
MLP matrices). Set ``scale`` higher (1–4) for fine-tuning: GaLore's 0.25 is a
pretraining value.

Args:
    params: parameters or param groups (groups may override any argument below).
    lr, betas, eps, weight_decay, maximize: as in ``torch.optim.AdamW`` (but
        ``weight_decay`` defaults to 0, GaLore's setting).
    rank (int or None): :math:`r`; clipped to :math:`\min(m, n)`. Default 128.
    update_proj_gap (int): :math:`T`, steps between SVDs of a matrix. Default 200.
    scale (float): :math:`\alpha`, multiplies the projected update. Default 0.25.
    proj_type (str): ``"std"`` (compress the smaller side), ``"reverse_std"``,
        ``"left"``, ``"right"`` or ``"full"``; see :mod:`lowrank_optim.projector`.
    svd (str): ``"exact"`` (``torch.linalg.svd``) or ``"randomized"``
        (a Gaussian sketch with power iterations, see :mod:`lowrank_optim.projector`;
        much cheaper for :math:`r \ll \min(m, n)`).
    state_on_refresh (str): what happens to the moments when the basis changes:
        ``"keep"`` (the reference: moments are reused as they are), ``"project"``
        (first moment rotated into the new basis, :math:`R^\top M`; second moment with
        the squared rotation) or ``"reset"`` (zeroed, bias correction restarted).
        Default ``"project"``; why: ``docs/decisions.md`` (Moments at a basis change).
    stagger (bool): spread the matrices' refreshes over one gap (matrix :math:`i` of
        :math:`N` refreshes at :math:`0`, then :math:`\phi_i = \lceil T(i+1)/N \rfloor`,
        :math:`\phi_i + T`, ...) so no step pays every SVD at once. With
        ``stagger=False`` all refresh at :math:`0, T, 2T, \dots` as in the reference.

With ``svd="exact"``, ``stagger=False`` and ``state_on_refresh="keep"`` the projected
arithmetic is galore-torch's ``GaLoreAdamW`` (whose ε default is 1e-6; ours is torch's
1e-8), except that weight decay is applied before the update, as in torch, rather than to
the already-updated weight.

Example:
    >>> import torch, lowrank_optim as lo
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> opt = lo.GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_proj_gap=50)
    >>> loss = model(torch.randn(16, 32)).square().mean()
    >>> loss.backward(); opt.step(); opt.zero_grad()

Reference: J. Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024, https://arxiv.org/abs/2403.03507.
"""


class GaLoreAdamW8bit(LowRankOptimizer):
    """:class:`GaLoreAdamW` with both Adam moments stored as 8-bit blockwise codes.

    Moments of tensors with at least ``min_8bit_size`` elements (low-rank shape for
    projected matrices) are kept as uint8 codes in blocks of 256 with one float32 absmax
    per block (bitsandbytes' dynamic code, updated by
    ``bitsandbytes.functional.optimizer_update_8bit_blockwise``): about 2 bytes per
    element instead of 8 (:class:`~lowrank_optim.rules.Adam8bit`). Smaller tensors keep
    float32 moments, as bitsandbytes does. The update otherwise follows
    :class:`GaLoreAdamW`; the parameter itself is never swapped or resized.
    """

    rule = rules.Adam8bit()
    supports_fsdp2 = True  # where its blocks line up with the shards (lowrank_optim.fsdp)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: Optional[int] = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 svd: str = "exact", state_on_refresh: str = "project", stagger: bool = True,
                 min_8bit_size: int = 4096, *, maximize: bool = False):
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, betas=betas, eps=eps, min_8bit_size=min_8bit_size))


class GaLoreAdafactor(LowRankOptimizer):
    r""":class:`GaLoreAdamW`'s projection around Adafactor (Shazeer & Stern, 2018).

    The inner rule (:class:`~lowrank_optim.rules.Adafactor`) runs on the low-rank
    gradient :math:`R_t` with a *factored* second moment (row and column means,
    :math:`m + r` or :math:`r + n` floats instead of :math:`mr`),
    :math:`\hat\beta_{2,t} = 1 - t^{-0.8}`, RMS clipping of the update at
    ``clip_threshold`` and, when ``beta1`` is set, a first moment on the clipped update
    (the GaLore paper's Adafactor "with first-order statistics"). ``lr`` is an explicit
    learning rate (no relative step). Weight decay is decoupled, before the update.
    """

    rule = rules.Adafactor()
    supports_fsdp2 = True

    def __init__(self, params, lr: float = 1e-2, beta1: Optional[float] = 0.9,
                 eps: float = 1e-30, clip_threshold: float = 1.0, weight_decay: float = 0.0,
                 rank: Optional[int] = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", svd: str = "exact", state_on_refresh: str = "project",
                 stagger: bool = True, *, maximize: bool = False):
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, beta1=beta1, eps=eps, clip_threshold=clip_threshold))
