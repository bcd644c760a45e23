r"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the optimizers on sharded parameters.

Under FSDP2 every parameter and gradient is a ``DTensor``: each rank holds one slice
(``Shard(0)``, rows, by default; ``Shard(1)`` where ``fully_shard``'s
``shard_placement_fn`` says so) on a one-dimensional device mesh. ``GaLoreAdamW``,
``GaLoreAdamW8bit`` and ``GaLoreAdafactor`` step such a parameter on its local slice
(:func:`local_view`), in the same pipeline as a plain one:

* the basis lies on the *unsharded* dimension (a right basis :math:`Q`, n×r, of a
  ``Shard(0)`` matrix; a left basis :math:`P`, m×r, of a ``Shard(1)`` one) and is
  replicated: a plain tensor, equal on every rank. The projected gradient
  (:math:`G_i Q` or :math:`P^\top G_i`), the moments, a basis change's r×r rotation and
  the update (:math:`W_i \mathrel{-}= \eta\alpha N_i Q^\top`) are then all local, so
  **between refreshes an Adam step communicates nothing** but one number: the ranks'
  shared verdict of the non-finite check (:func:`agree`: a NaN/Inf in one rank's slice
  skips the step on every rank; per-layer mode: one per parameter; none with
  ``skip_nonfinite = False``);
* the moments are ``DTensor``\ s with the parameter's mesh and placement, of the global
  shape a single process would have, so ``torch.distributed.checkpoint`` saves and
  reshards them exactly (2 ranks onto 1 and back). Plain tensors would be saved as if
  replicated (DCP then loads the wrong moments silently, or fails on uneven shards);
* a refresh with ``svd="exact"`` gathers that one layer's gradient (one all-gather),
  and every rank computes the same basis from the same whole matrix: the result equals
  the single-process one. The non-finite check runs on the gathered gradient, identical
  on every rank, so all ranks keep or refresh the basis together (no rank waits alone
  in a collective). ``svd="randomized"`` never gathers the gradient
  (:meth:`Shards.randomized_svd`): local sketches, TSQR of small q×q triangles and
  all-reduces of q-column sketches, a few MB per LLaMA-7B matrix against the 64-172 MB
  of its gradient (``benchmarks/results/fsdp.md``); a NaN/Inf shows in the first
  reduced sketch, again on every rank;
* ``GaLoreAdamW8bit``'s 8-bit moments (blocks of 256 elements, one absmax each) work
  where each rank's slice is whole blocks of the single-process moment (a row-split
  moment whose rows per rank times its row length is a multiple of 256: LLaMA-7B's
  attention and gate/up matrices at 8 and 64 ranks); elsewhere a clear error
  (:func:`_check_blocks`, ``benchmarks/bench_fsdp.py`` counts the cases);
* ``GaLoreAdafactor``'s factored second moment and its RMS clipping are means over the
  whole low-rank matrix: two small all-reduces per step (r+1 and 1 floats), so its
  steps also equal the single-process ones.

What cannot work raises a clear error at construction (:func:`check_param`): a basis
that would lie on the sharded dimension (a left basis on a ``Shard(0)`` matrix needs an
r×n all-reduce at every step: shard that matrix on dim 1 with
:func:`shard_placement_fn`, or choose another ``proj_type``), ``proj_type="full"``,
meshes of more than one dimension (HSDP, tensor parallelism), 8-bit moments whose
blocks do not line up with the shards, and the optimizers whose state cannot be sharded
yet (Q-GaLore, LoQT: see :data:`UNSUPPORTED`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import _dtensor_class
from .projector import BOTH, LEFT, RIGHT, choose_side

__all__ = ["is_sharded", "Shards", "shards_of", "local_shape", "global_numel", "check_param",
           "local_view", "shard_placement_fn", "stepping", "local", "agree", "is_checkpoint_init"]


def is_sharded(p: Tensor) -> bool:
    """True for a ``DTensor`` (an FSDP2-sharded parameter or gradient)."""
    return isinstance(p, _dtensor_class())


@dataclass(frozen=True)
class Shards:
    """How a parameter is split: on ``dim`` (0 or 1) of a one-dimensional ``mesh``,
    ``size`` elements there in all (the global shape is ``shape``)."""

    mesh: object
    dim: int
    shape: tuple

    @property
    def size(self) -> int:
        return self.shape[self.dim]

    @property
    def group(self):
        return self.mesh.get_group()

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place."""
        dist.all_reduce(t, group=self.group)
        return t

    def wrap(self, local: Tensor, dim: int, size: int) -> Tensor:
        """A ``DTensor`` of this mesh split on ``dim`` (global size ``size`` there)
        whose slice on this rank is ``local``."""
        from torch.distributed.tensor import DTensor, Shard

        shape = list(local.shape)
        shape[dim] = size
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, (Shard(dim),), shape=torch.Size(shape),
                                  stride=stride)

    def gather(self, local: Tensor) -> Tensor:
        """The whole matrix from every rank's slice ``local`` (one all-gather)."""
        return self.wrap(local, self.dim, self.size).full_tensor()

    def offset(self) -> int:
        """Where this rank's slice starts on ``dim`` (``torch.chunk``'s split, as FSDP2's)."""
        chunk = -(-self.size // self.mesh.size())
        return min(self.mesh.get_local_rank() * chunk, self.size)

    def _tsqr(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """QR of the tall matrix whose row slices are the ranks' ``y`` (k columns) by
        TSQR: a local QR, an all-gather of the k×k triangles, the QR of their stack.
        Returns this rank's rows of Q, R, and the stack (R and the stack are the same
        on every rank)."""
        k = y.shape[1]
        q, r = torch.linalg.qr(y)
        mine = y.new_zeros(k, k)
        mine[:r.shape[0]] = r
        stack = y.new_empty(self.mesh.size() * k, k)
        dist.all_gather_into_tensor(stack, mine, group=self.group)
        q2, r2 = torch.linalg.qr(stack)
        i = self.mesh.get_local_rank() * k
        return q @ q2[i:i + r.shape[0]], r2, stack

    def randomized_svd(self, local: Tensor, rank: int, oversample: int = 8, niter: int = 1,
                       seed: int = 0) -> Optional[tuple[Tensor, Tensor]]:
        r""":func:`lowrank_optim.projector.compute_basis`'s randomized SVD of the whole
        matrix :math:`G` whose slice on this rank is ``local``, without gathering
        :math:`G`: the same seeded sketch :math:`\Omega` (n×q, q = r + oversample), the
        range of :math:`G\Omega` orthonormalised by TSQR (rows split) or from an
        all-reduce of the m×q sketch (columns split), ``niter`` power iterations, then
        the small SVD. Returns ``(U_r, V_r)``, the factor on the sharded dimension as
        this rank's slice and the other whole (the same on every rank; the one a basis
        may use), or ``None`` when :math:`G` has NaN/Inf values, which every rank sees
        in the first gathered or reduced sketch, so they all decide alike.

        Communication per rank (float32, W ranks, rows split): (1+niter) all-gathers
        of W q×q triangles and (niter+1) all-reduces of q×n, against the m×n all-gather
        of ``svd="exact"`` (columns split: m and n swap roles)."""
        a = local.float()
        m, n = (self.size, a.shape[1]) if self.dim == 0 else (a.shape[0], self.size)
        r = min(rank, m, n)
        q = min(r + oversample, m, n)
        gen = torch.Generator(device=a.device).manual_seed(seed)
        sketch = torch.randn(n, q, generator=gen, device=a.device)
        if self.dim == 0:  # rows split: the range lives in row slices (TSQR)
            basis, _, stack = self._tsqr(a @ sketch)
            if not bool(torch.isfinite(stack).all()):
                return None
            for _ in range(niter):
                z = torch.linalg.qr(self.all_reduce_(a.T @ basis)).Q
                basis = self._tsqr(a @ z)[0]
            b = self.all_reduce_(basis.T @ a)  # q×n, whole
            if n <= q:
                ub, _, vh = torch.linalg.svd(b, full_matrices=False)
                return (basis @ ub)[:, :r].contiguous(), vh[:r].T.contiguous()
            qb, rb = torch.linalg.qr(b.T)
            ub, _, wh = torch.linalg.svd(rb.T)
            return (basis @ ub[:, :r]).contiguous(), qb @ wh[:r].T
        # columns split: the sketch's rows follow the columns; the range is whole
        off = self.offset()
        y = self.all_reduce_(a @ sketch[off:off + a.shape[1]])
        if not bool(torch.isfinite(y).all()):
            return None
        basis = torch.linalg.qr(y).Q
        for _ in range(niter):
            z = self._tsqr(a.T @ basis)[0]
            basis = torch.linalg.qr(self.all_reduce_(a @ z)).Q
        b = basis.T @ a  # q × (this rank's columns)
        if n <= q:
            ub, _, vh = torch.linalg.svd(self.gather(b), full_matrices=False)
            return (basis @ ub)[:, :r].contiguous(), vh[:r].T[off:off + a.shape[1]].contiguous()
        qb, rb, _ = self._tsqr(b.T)
        ub, _, wh = torch.linalg.svd(rb.T)
        return (basis @ ub[:, :r]).contiguous(), qb @ wh[:r].T


def local_shape(shape, shards: Optional[Shards], local: Tensor) -> tuple:
    """``shape`` (of a whole low-rank matrix) with the sharded dimension's size taken
    from this rank's slice ``local`` (unchanged without ``shards``)."""
    if shards is None:
        return tuple(shape)
    out = list(shape)
    out[shards.dim] = local.shape[shards.dim]
    return tuple(out)


def shards_of(p: Tensor) -> Optional[Shards]:
    """The :class:`Shards` of a sharded parameter (``None`` for a plain tensor)."""
    if not is_sharded(p):
        return None
    return Shards(p.device_mesh, p.placements[0].dim, tuple(p.shape))


# the optimizers that cannot step sharded parameters yet, and why
UNSUPPORTED = {
    "QGaLoreAdamW8bit": "its INT8 weights are a tensor subclass that FSDP2 cannot shard, its "
                        "quantized basis and lazy refresh queue are not made rank-symmetric",
    "LoQTAdamW": "its layers hold quantized weights and a projection as buffers that every "
                 "rank would have to merge from the whole weight",
    "LoQTAdamW8bit": "see LoQTAdamW",
}


def check_param(optimizer, p: Tensor, group: dict, where: str) -> None:
    """Raise a clear error unless ``optimizer`` can step the sharded parameter ``p``
    (``where``: its position, for the message); nothing for a plain tensor."""
    if not is_sharded(p):
        return
    from torch.distributed.tensor import Shard

    name = type(optimizer).__name__
    desc = f"{where} (DTensor of shape {tuple(p.shape)}, placements {tuple(p.placements)})"
    if not getattr(optimizer, "supports_fsdp2", False):
        why = UNSUPPORTED.get(name, "it has not been made to work on shards")
        raise NotImplementedError(
            f"{name} does not support FSDP2-sharded parameters ({desc}): {why}. Use "
            "GaLoreAdamW, GaLoreAdamW8bit or GaLoreAdafactor under FSDP2, or "
            "DistributedDataParallel "
            f"(per-layer mode: opt.register_hooks(ddp_model)) with {name}.")
    if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
        raise NotImplementedError(
            f"{name} supports FSDP2 on a one-dimensional mesh with a Shard placement; "
            f"{desc} is on a {p.device_mesh.ndim}-D mesh (HSDP or tensor parallelism). "
            "Shard the model with fully_shard on a 1-D mesh, or use DistributedDataParallel.")
    if "min_8bit_size" in group:
        _check_blocks(optimizer, p, group, desc)
    if p.dim() != 2 or not optimizer.is_projected(p, group):
        return
    dim, ptype = p.placements[0].dim, group["proj_type"]
    side = choose_side(p.shape, ptype)
    if side == BOTH:
        raise NotImplementedError(
            f"{name}: proj_type='full' puts a basis on both dimensions of {desc}, one of "
            "them sharded (an r×n all-reduce at every step); use proj_type='std' under FSDP2")
    basis_dim = 0 if side == LEFT else 1
    if basis_dim == dim:
        other, dims = 1 - dim, ("rows", "columns")
        how = (f"does so when {p.shape[1]} divides by the world size" if other == 1 else
               "keeps FSDP2's default Shard(0) for it")
        fn = "shard_placement_fn()" if ptype == "std" else f"shard_placement_fn({ptype!r})"
        raise ValueError(
            f"{name}: proj_type={ptype!r} puts the basis of {desc} on its {dims[dim]} "
            f"(dim {dim}), the dimension FSDP2 shards: projecting would need an all-reduce "
            f"at every step. Shard it on dim {other} instead: fully_shard(..., "
            f"shard_placement_fn=lowrank_optim.{fn}) {how}; or use proj_type="
            f"{'right' if side == LEFT else 'left'!r} for it (a {p.shape[1 - basis_dim]}"
            f"-row basis), or put it in a param group with rank=None (plain AdamW).")


def _moment_shape(optimizer, p: Tensor, group: dict) -> tuple:
    """The global shape of ``p``'s moments (the low-rank shape of a projected matrix)."""
    if p.dim() != 2 or not optimizer.is_projected(p, group):
        return tuple(p.shape)
    m, n = p.shape
    r = min(group["rank"], m, n)
    side = choose_side(p.shape, group["proj_type"])
    return {LEFT: (r, n), RIGHT: (m, r), BOTH: (r, r)}[side]


def _check_blocks(optimizer, p: Tensor, group: dict, desc: str) -> None:
    """8-bit moments (blocks of 256 elements of the flattened moment, one absmax each) on
    a shard: each rank's slice must be whole blocks of the single-process moment, so that
    every rank quantizes exactly the blocks one process would, and the absmax vector
    splits like a ``Shard(0)`` DTensor (then DCP reshards both exactly). That holds for
    a row-split moment whose rows per rank times its row length is a multiple of 256;
    never for a column-split one (a rank's columns are not contiguous in it)."""
    from .functional import BLOCK_8BIT

    shape = _moment_shape(optimizer, p, group)
    numel = math.prod(shape)
    if numel < group["min_8bit_size"]:
        return  # float32 moments
    dim, world = p.placements[0].dim, p.device_mesh.size()
    row = numel // shape[0]
    rows = -(-shape[0] // world)
    blocks = -(-numel // BLOCK_8BIT)
    fix = (f"Use GaLoreAdamW, or min_8bit_size > {numel} to keep this tensor's moments in "
           "float32")
    if dim != 0 and len(shape) == 2:
        raise ValueError(
            f"{type(optimizer).__name__}: the 8-bit moments of {desc}, shape {shape}, are "
            f"split on their columns, and a rank's columns are not contiguous in the "
            f"256-element blocks of the flattened moment. {fix}, or FSDP2's default "
            "Shard(0) for it (with proj_type='right' if it is projected).")
    if (rows * row) % BLOCK_8BIT or -(-blocks // world) != rows * row // BLOCK_8BIT:
        raise ValueError(
            f"{type(optimizer).__name__}: the 8-bit moments of {desc}, shape {shape}, hold "
            f"{rows} rows × {row} = {rows * row} elements per rank, not an even split of "
            f"its {blocks} whole blocks of {BLOCK_8BIT} over {world} ranks: the ranks would "
            f"quantize other blocks than one process. {fix}.")


def global_numel(local: Tensor) -> int:
    """The number of elements of the whole tensor whose slice is ``local`` while a
    sharded parameter is stepped (:func:`stepping`; ``local.numel()`` otherwise): the
    size a rule's choices (8-bit or float32 moments) must depend on."""
    shards = stepping()
    if shards is None or local.dim() <= shards.dim:
        return local.numel()
    return math.prod(shards.size if i == shards.dim else s for i, s in enumerate(local.shape))


def shard_placement_fn(proj_type: str = "std", world_size: Optional[int] = None) -> Callable:
    """A ``shard_placement_fn`` for ``fully_shard`` that puts every matrix's basis on its
    unsharded dimension: a matrix whose ``proj_type`` basis is on the rows (a wide
    matrix under ``"std"``: left basis) is sharded on dim 1 when its columns divide by
    the world size (FSDP2 needs that for ``Shard(1)``); every other parameter keeps
    FSDP2's default ``Shard(0)``.

    Example::

        fully_shard(block, shard_placement_fn=lowrank_optim.shard_placement_fn())
    """
    choose_side((1, 1), proj_type)  # validates proj_type

    def fn(p: Tensor):
        from torch.distributed.tensor import Shard

        if p.dim() != 2 or choose_side(p.shape, proj_type) != LEFT:
            return None
        world = world_size or dist.get_world_size()
        return Shard(1) if p.shape[1] % world == 0 else None

    return fn


_STEPPING: contextvars.ContextVar = contextvars.ContextVar("lowrank_optim_fsdp_stepping",
                                                         default=None)


def stepping() -> Optional[Shards]:
    """The :class:`Shards` of the parameter being stepped inside :func:`local_view`
    (``None`` outside, or for a plain parameter): a rule whose math reduces over the
    whole tensor (Adafactor) asks it."""
    return _STEPPING.get()


@contextlib.contextmanager
def local_view(p: Tensor, grad: Optional[Tensor], state: dict):
    """``(w, g, st, shards)``: this rank's slices of ``p`` and ``grad`` and of the state
    tensors (``st``, a dict; writes to its tensors write the state), and ``p``'s
    :class:`Shards`. On exit, tensors that were put into ``st`` are stored back, the
    moments as ``DTensor``\\ s (:func:`_store_back`). A plain ``p`` passes through."""
    shards = shards_of(p)
    if shards is None:
        yield p, grad, state, None
        return
    view = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()}
    before = dict(view)
    token = _STEPPING.set(shards)
    try:
        yield p.to_local(), None if grad is None else grad.to_local(), view, shards
    finally:
        _STEPPING.reset(token)
        for k in set(state) - set(view):
            del state[k]
        for k, v in view.items():
            if k not in before or v is not before[k]:
                state[k] = _store_back(k, v, shards, view)


def _store_back(key: str, v, shards: Shards, view: dict):
    """A state entry as stored: a moment (shaped like the local gradient or its
    projection, split on the same dimension) as a ``DTensor``; the basis (``proj*``),
    numbers and a replicated Adafactor factor as they are."""
    if not isinstance(v, Tensor) or key.startswith("proj"):
        return v
    d = shards.dim
    if key.endswith("_absmax"):  # 8-bit: one per 256-element block, whole blocks per rank
        from .functional import BLOCK_8BIT

        codes = view[key[:-len("_absmax")] + "_codes"]
        numel = codes.numel() // max(1, codes.shape[0]) * shards.size
        return shards.wrap(v, 0, -(-numel // BLOCK_8BIT))
    if key in ("exp_avg_sq_row", "exp_avg_sq_col"):  # Adafactor's factors of a matrix
        own = 0 if key == "exp_avg_sq_row" else 1
        return shards.wrap(v, 0, shards.shape[own]) if own == d else v
    if v.dim() <= d:
        raise RuntimeError(f"cannot shard the optimizer state {key!r} of shape "
                           f"{tuple(v.shape)} on dim {d}")  # a rule this module does not know
    return shards.wrap(v, d, shards.size)


def local(t: Tensor) -> Tensor:
    """This rank's slice of a ``DTensor`` (``to_local()``); any other tensor itself."""
    return t.to_local() if is_sharded(t) else t


def agree(ok: bool, params) -> bool:
    """``ok`` if it holds on every rank (a logical AND over the mesh of the first sharded
    parameter in ``params``; ``ok`` itself when none is sharded; one all-reduce of one
    number). A decision taken on local slices that changes which collectives a rank runs
    (skipping a step for a NaN/Inf in its slice of a gradient also skips that step's
    refresh all-gathers) must be taken alike by every rank, or the others wait forever:
    check ``to_local()`` slices, then ``agree``."""
    sharded = next((p for p in params if is_sharded(p)), None)
    if sharded is None:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=sharded.to_local().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=sharded.device_mesh.get_group())
    return flag.item() == 1.0


def is_checkpoint_init(optimizer) -> bool:
    """True when ``step()`` is called by ``torch.distributed.checkpoint`` to create the
    state of a fresh optimizer (``_init_optim_state`` of
    ``torch/distributed/checkpoint/state_dict.py``): no state yet, every learning rate
    0, and every parameter that requires grad has an all-zero gradient (set by
    ``zeros_like``). On sharded parameters the ranks agree by one small all-reduce (a
    real first step at lr 0 whose gradients are zero on only some ranks must not send
    them down different paths); it runs only when the cheap checks pass."""
    if optimizer.state or any(float(g["lr"]) != 0.0 for g in optimizer.param_groups):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(p.grad is not None for p in params):
        return False
    zero = all(p.grad is not None and not (p.grad.to_local() if is_sharded(p.grad)
                                           else p.grad).any()
               for p in params if p.requires_grad)
    return agree(zero, params)

