r"""The low-rank gradient projector shared by GaLore, Q-GaLore and LoQT.

For a 2-D gradient :math:`G \in \mathbb{R}^{m \times n}` with truncated SVD
:math:`G \approx U_r S_r V_r^\top` (:math:`r` = ``rank``), a projector keeps an
orthonormal basis :math:`P` (:math:`P^\top P = I_r`) on one side:

=========  ==========================  ===================  ======================
side       basis                       project :math:`R`    project back :math:`N`
=========  ==========================  ===================  ======================
``LEFT``   :math:`P = U_r` (m×r)       :math:`P^\top G` (r×n)   :math:`P N`
``RIGHT``  :math:`Q = V_r` (n×r)       :math:`G Q` (m×r)        :math:`N Q^\top`
``BOTH``   :math:`P, Q`                :math:`P^\top G Q` (r×r) :math:`P N Q^\top`
=========  ==========================  ===================  ======================

``proj_type`` picks the side from the shape once, at the first refresh, and the side is
stored; it is never re-derived from the shape of a low-rank tensor:

* ``"std"`` (GaLore's default) compresses the smaller dimension: ``RIGHT`` when
  :math:`m \ge n`, else ``LEFT``. State is :math:`\max(m,n) \times r`, basis
  :math:`\min(m,n) \times r`.
* ``"reverse_std"`` compresses the larger one; ``"left"``, ``"right"``, ``"full"``
  (``BOTH``) force a side.

:math:`\Pi(G) = \mathrm{back}(\mathrm{project}(G))` is an orthogonal projection: it is
idempotent and never increases the Frobenius norm.

The rank is clipped to :math:`\min(m, n)` (a basis cannot have more orthonormal columns).
The basis is computed in float32 by exact SVD (``svd="exact"``, ``torch.linalg.svd``) or
randomized SVD (``svd="randomized"``: a Gaussian sketch of ``r + oversample`` columns,
``niter`` QR-orthonormalised power iterations (default 1), then the exact SVD of the small
:math:`(r+p) \times n` matrix, through the :math:`(r+p)`-square triangle of its QR when it is
wide (Halko, Martinsson & Tropp, 2011); :math:`O(mnr)` instead of :math:`O(mn\min(m,n))`).
One power iteration by default, chosen by measurement (``docs/decisions.md``, Randomized
SVD). The sketch is
drawn from its own generator seeded by the caller
(the optimizers use the refresh count), never from the global RNG, so runs are
reproducible and do not depend on the order in which layers are refreshed.

With ``quant_bits`` set (Q-GaLore), the basis is stored as ``quant_bits``-bit
asymmetric min-max codes in groups of ``quant_group_size`` (packed two per byte at
4 bits), quantized once per refresh and dequantized on use.

Failures get a defined behaviour: a gradient with NaN/Inf, or an SVD that does not
converge, keeps the previous basis (with a warning) and raises
:class:`FloatingPointError` / :class:`RuntimeError` when there is no previous basis.

All tensors live in a caller-owned flat ``state`` dict (optimizer state):
``proj_side`` (int), ``proj`` (float32 basis, or ``proj_codes``/``proj_scale``/
``proj_offset`` when quantized) and, for ``BOTH``, ``proj_right`` likewise.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from . import quant
from ._checks import check_int

__all__ = ["Projector", "LEFT", "RIGHT", "BOTH", "PROJ_TYPES", "SVD_METHODS", "choose_side",
           "compute_basis", "overlap"]

LEFT, RIGHT, BOTH = 0, 1, 2
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")


def choose_side(shape, proj_type: str) -> int:
    """The side rule above, for a 2-D ``shape`` (m, n)."""
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type in ("left", "right", "full"):
        return {"left": LEFT, "right": RIGHT, "full": BOTH}[proj_type]
    raise ValueError(f"Invalid proj_type: {proj_type!r} (expected one of {PROJ_TYPES})")


def compute_basis(g: Tensor, rank: int, svd: str = "exact", oversample: int = 8,
                  niter: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Float32 ``(U_r, V_r)`` of ``g``, with ``r = min(rank, m, n)``; both column-orthonormal."""
    a = g.detach().float()
    r = min(rank, *a.shape)
    if svd == "exact":
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        # copies, not views: a slice would keep the whole U / Vh storage alive
        return u[:, :r].contiguous(), vh[:r].T.contiguous()
    if svd == "randomized":
        q = min(r + oversample, *a.shape)
        # meta tensors (memory accounting) have no generator and need no random numbers
        gen = None if a.device.type == "meta" else \
            torch.Generator(device=a.device).manual_seed(seed)
        sketch = torch.randn(a.shape[1], q, generator=gen, device=a.device)
        basis = torch.linalg.qr(a @ sketch).Q
        for _ in range(niter):
            basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
        b = basis.T @ a  # q x n: a ≈ basis @ b
        if b.shape[1] <= b.shape[0]:
            ub, _, vh = torch.linalg.svd(b, full_matrices=False)
            return (basis @ ub)[:, :r].contiguous(), vh[:r].T.contiguous()
        # a wide b: the SVD of the q x q triangle of b's QR has the same singular vectors
        # (b = rᵀ·qᵀ, rᵀ = ub·s·wh, so b = ub·s·(qb·whᵀ)ᵀ) and costs half of svd(b)
        qb, rb = torch.linalg.qr(b.T)
        ub, _, wh = torch.linalg.svd(rb.T)
        return (basis @ ub[:, :r]).contiguous(), qb @ wh[:r].T
    raise ValueError(f"Invalid svd: {svd!r} (expected one of {SVD_METHODS})")


@dataclass(frozen=True)
class Projector:
    """Hyperparameters of a projector; tensors live in the caller's ``state`` dict."""

    rank: int
    proj_type: str = "std"
    svd: str = "exact"
    quant_bits: Optional[int] = None
    quant_group_size: int = 256

    def __post_init__(self):
        check_int("rank", self.rank)
        choose_side((1, 1), self.proj_type)  # validates proj_type
        if self.svd not in SVD_METHODS:
            raise ValueError(f"Invalid svd: {self.svd!r} (expected one of {SVD_METHODS})")
        if self.quant_bits is not None:
            quant._check(self.quant_bits, self.quant_group_size, "asym")

    # -- storage ------------------------------------------------------------------------
    def _store(self, state: dict, key: str, basis: Tensor) -> None:
        if self.quant_bits is None:
            state[key] = basis
        else:
            quant.put(state, key, quant.quantize(basis, self.quant_bits, self.quant_group_size))

    def _load(self, state: dict, key: str, like: Tensor) -> Tensor:
        if self.quant_bits is None:
            basis = state[key]
        else:
            rows = like.shape[0] if key == "proj" and state["proj_side"] != RIGHT else like.shape[1]
            q = quant.get(state, key, (rows, min(self.rank, *like.shape)), self.quant_bits,
                          self.quant_group_size, "asym")
            basis = q.dequantize()
        return basis

    def has_basis(self, state: dict) -> bool:
        return "proj_side" in state

    def clear(self, state: dict) -> None:
        """Remove the basis (and its side) from ``state``: the next refresh is a first one."""
        for key in [k for k in state if k.startswith("proj")]:
            del state[key]

    # -- refresh ------------------------------------------------------------------------
    def refresh(self, state: dict, grad: Tensor, seed: int = 0,
                shards=None) -> Optional[tuple]:
        r"""Recompute the basis from ``grad`` and store it in ``state``.

        Returns the rotations ``(R_left, R_right)`` from the old basis to the new one,
        :math:`R = P_{old}^\top P_{new}` (``None`` for a side not in use), so a caller can
        measure the change (:func:`overlap`) or carry low-rank state over
        (:meth:`transport`). Returns ``None`` on the first refresh and when the refresh
        was skipped (non-finite gradient, SVD failure; see the module docstring).

        ``shards`` (a :class:`lowrank_optim.fsdp.Shards`): ``grad`` is this rank's slice
        of an FSDP2-sharded gradient; ``svd="exact"`` gathers the whole gradient,
        ``"randomized"`` sketches it where it lies (:meth:`~lowrank_optim.fsdp.Shards.
        randomized_svd`). The checks then run on what every rank holds alike, so all
        ranks keep or refresh the basis together.
        """
        if grad.dim() != 2:
            raise ValueError(f"The projector needs a 2-D gradient, got shape {tuple(grad.shape)}")
        if shards is not None and self.svd == "exact":
            grad, shards = shards.gather(grad), None
        shape = tuple(grad.shape) if shards is None else shards.shape
        first = not self.has_basis(state)
        side = choose_side(shape, self.proj_type) if first else state["proj_side"]
        # a slice's NaN/Inf is seen by every rank in the sketch they reduce (uv None)
        uv = None
        try:
            if shards is not None:
                uv = shards.randomized_svd(grad, self.rank, seed=seed)
            elif grad.device.type == "meta" or bool(torch.isfinite(grad).all()):
                uv = compute_basis(grad, self.rank, self.svd, seed=seed)
        except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
            if first:
                raise RuntimeError(f"SVD of the gradient of shape {shape} failed "
                                   f"at its first refresh: {exc}") from exc
            warnings.warn(f"SVD failed at a projector refresh ({exc}): keeping the previous basis")
            return None
        if uv is None:  # NaN/Inf in the gradient
            if first:
                raise FloatingPointError(
                    f"Gradient of shape {shape} has NaN/Inf values at its first "
                    "projector refresh: there is no basis to fall back on")
            warnings.warn("Non-finite gradient at a projector refresh: keeping the previous basis")
            return None
        u, v = uv
        new_left = u if side in (LEFT, BOTH) else None
        new_right = v if side in (RIGHT, BOTH) else None
        rots = None
        if not first:
            old_left, old_right = self.bases(state, grad)
            rots = (None if new_left is None else old_left.T @ new_left,
                    None if new_right is None else old_right.T @ new_right)
        state["proj_side"] = side
        self._store(state, "proj", u if side != RIGHT else v)
        if side == BOTH:
            self._store(state, "proj_right", v)
        return rots

    @staticmethod
    def transport(low: Tensor, rots: tuple, squared: bool = False) -> Tensor:
        r"""Re-express low-rank coordinates taken in the old basis in the new one
        (:math:`R_l^\top X R_r`); ``squared`` uses the element-wise squared rotations,
        which maps non-negative second moments to non-negative values."""
        return _sandwich(low, *(None if r is None else (r.square() if squared else r)
                                for r in rots))

    def bases(self, state: dict, like: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The bases stored in ``state`` for a gradient like ``like``: (left ``U_r``, m×r,
        or None; right ``V_r``, n×r, or None), float32 (dequantized when stored quantized)."""
        side, p = state["proj_side"], self._load(state, "proj", like)
        if side == LEFT:
            return p, None
        if side == RIGHT:
            return None, p
        return p, self._load(state, "proj_right", like)

    def basis_shapes(self, state: dict, shape) -> dict:
        """Shapes of the stored float bases of a parameter of ``shape``."""
        m, n = shape
        r = min(self.rank, m, n)
        if self.quant_bits is not None:
            return {}
        side = state["proj_side"]
        out = {"proj": (n, r) if side == RIGHT else (m, r)}
        if side == BOTH:
            out["proj_right"] = (n, r)
        return out

    # -- apply ------------------------------------------------------------------------
    def project(self, state: dict, grad: Tensor) -> Tensor:
        """Low-rank float32 coordinates of ``grad`` in the stored basis."""
        return _sandwich(grad, *self.bases(state, grad))

    def project_back(self, state: dict, low: Tensor, like: Tensor) -> Tensor:
        """Full-size float32 tensor (shape of ``like``) from low-rank ``low``."""
        left, right = self.bases(state, like)
        out = low.float()
        if left is not None:
            out = left @ out
        if right is not None:
            out = out @ right.T
        return out

    def add_back_(self, state: dict, target: Tensor, low: Tensor, alpha: float) -> Tensor:
        """``target += alpha · project_back(low)`` in place. For a float32 ``target`` and a
        one-sided basis this is one fused GEMM (``addmm_``): the full-size update is
        never materialised. Other dtypes get a float32 update and a single rounding."""
        left, right = self.bases(state, target)
        if target.dtype == torch.float32 and (left is None) != (right is None):
            if left is not None:
                return target.addmm_(left, low.float(), alpha=alpha)
            return target.addmm_(low.float(), right.T, alpha=alpha)
        return F.add_(target, self.project_back(state, low, target), alpha=alpha)

    def low_rank_shape(self, state: dict, shape) -> tuple[int, int]:
        """Shape of ``project``'s output for a parameter of ``shape``."""
        m, n = shape
        r = min(self.rank, m, n)
        return {LEFT: (r, n), RIGHT: (m, r), BOTH: (r, r)}[state["proj_side"]]


def overlap(rots: tuple) -> float:
    r"""Subspace similarity from :meth:`Projector.refresh`'s rotations, in [0, 1]:
    :math:`\|P_{old}^\top P_{new}\|_F^2 / r`, averaged over the sides in use. It is 1 for
    an unchanged subspace whatever the signs or order of the basis vectors, and about
    :math:`r/d` for unrelated random subspaces of dimension :math:`d`."""
    vals = [float(r.square().sum()) / min(r.shape) for r in rots if r is not None]
    return sum(vals) / len(vals)


def _sandwich(x: Tensor, left: Optional[Tensor], right: Optional[Tensor]) -> Tensor:
    """``leftᵀ · x · right`` in float32, a side that is ``None`` left out."""
    out = x.float()
    if left is not None:
        out = left.T @ out
    if right is not None:
        out = out @ right
    return out
