r"""``torch.distributed`` support: DDP in normal and per-layer mode.

**DistributedDataParallel, normal stepping** needs nothing from this package: DDP
all-reduces (averages) every gradient during ``backward()``, so at ``opt.step()`` every
rank holds the same gradient and computes the same basis, the same moments and the same
update. Everything the optimizers draw at random is seeded by values that are equal on
every rank (randomized-SVD sketches by the refresh count, stochastic-rounding noise by
the group's ``seed``, the parameter's index and its step; the refresh phases of
``stagger`` by the parameter's position), so replicas stay bit-identical.

Q-GaLore's INT8 weights (:class:`~lowrank_optim.nn.QuantWeight`) are no exception:
their gradient is an ordinary float ``.grad`` that DDP averages in its buckets.

**Per-layer mode under DDP** (``opt.register_hooks(ddp_model)``): a parameter may be
stepped only once its gradient is averaged, so instead of gradient hooks (which fire
before the all-reduce: the replicas of galore-torch's layer-wise mode drift apart) a DDP
communication hook steps the parameters of each gradient bucket right after that
bucket's all-reduce (:func:`attach_ddp`; the mechanism of torch's own
``_apply_optimizer_in_backward``). See :func:`lowrank_optim.hooks.register_hooks`.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): :mod:`lowrank_optim.fsdp`.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean_", "is_ddp", "attach_ddp", "replica_divergence"]


def _dtensor_class():
    """``DTensor`` if its module is loaded (a DTensor parameter implies it is; importing it
    here would cost seconds), else ``()`` (``isinstance(x, ())`` is always False)."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5, < 2.5
        if (mod := sys.modules.get(name)) is not None and hasattr(mod, "DTensor"):
            return mod.DTensor
    return ()


def _ddp_class():
    if not dist.is_available():
        return ()
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def is_ddp(model: torch.nn.Module) -> bool:
    """True when ``model`` is wrapped in ``DistributedDataParallel``."""
    return isinstance(model, _ddp_class())


def all_reduce_mean_(t: Tensor, group=None) -> Tensor:
    """Average ``t`` in place over ``group`` (default: the default group), as DDP averages
    gradients (divide, then sum: the same bits on every rank); a no-op without an
    initialized process group of more than one rank."""
    if dist.is_available() and dist.is_initialized() and (n := dist.get_world_size(group)) > 1:
        t.div_(n)
        dist.all_reduce(t, group=group)
    return t


def replica_divergence(module: torch.nn.Module, group=None) -> float:
    """Max |Δ| between this rank's parameters and buffers and rank 0's (0.0: the replicas
    are bit-identical); the same number on every rank. A collective: call it everywhere."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in module.state_dict().values()])
    ref = flat.clone()
    dist.broadcast(ref, src=dist.get_global_rank(group, 0) if group is not None else 0,
                   group=group)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
    return diff.item()


# ---- per-layer mode: a DDP communication hook that steps each bucket --------------------


class _CommState:
    """State of the communication hook; one per DDP module (a hook cannot be removed,
    so ``register_hooks`` after ``handle.remove()`` re-arms the same one).

    ``steps`` holds the per-parameter unit of :mod:`lowrank_optim.hooks` (count, clip,
    step, free) of each optimizer in per-layer mode on this model (each skips the
    parameters it does not optimize); with none, the hook only averages and leaves the
    gradients in ``.grad`` for a normal ``opt.step()``.
    """

    def __init__(self, ddp):
        self.process_group = ddp.process_group
        self.find_unused = ddp.find_unused_parameters
        self.steps: list[Callable[[Tensor], None]] = []


def _comm_hook(state: _CommState, bucket):  # no annotations: DDP checks them as objects
    """Average the bucket (DDP's own ``allreduce_hook``), then step its parameters.

    The wait blocks the backward thread until this bucket is reduced (with NCCL it only
    orders the CUDA streams), so the parameters are stepped in the backward thread, in
    the same order on every rank, and the returned future is already complete. The
    reducer is in optimizer-in-backward mode, so it leaves ``.grad`` as set here: the
    averaged gradient (a view of the bucket) until ``step`` frees it. With
    ``find_unused_parameters=True`` a parameter that no rank used keeps ``.grad = None``
    and is not stepped, as in normal stepping (one more small all-reduce per bucket).
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    params = bucket.parameters()
    used = None
    if state.find_unused:  # locally used: backward (or an earlier micro-batch) made .grad
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                            device=bucket.buffer().device)
        used_work = dist.all_reduce(used, group=state.process_group, async_op=True)
    allreduce_hook(state.process_group, bucket).wait()
    if used is not None:
        used_work.wait()
        used = used.tolist()
    for i, (p, g) in enumerate(zip(params, bucket.gradients())):
        if used is not None and not used[i]:
            continue
        p.grad = g
        for step in state.steps:
            step(p)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _Handle:
    """Undoes :func:`attach_ddp`: per-layer stepping off; the communication hook stays as
    a plain all-reduce."""

    def __init__(self, state: _CommState, step):
        self.state, self.step = state, step

    def remove(self) -> None:
        if self.step in self.state.steps:
            self.state.steps.remove(self.step)


def attach_ddp(ddp, step: Callable[[Tensor], None]) -> _Handle:
    """Run ``step(p)`` for each DDP-managed parameter right after its bucket's all-reduce.

    Raises ``RuntimeError`` when the DDP module already has another communication hook.
    """
    state = ddp.__dict__.get("_lowrank_comm_state")
    if state is None:
        reducer = ddp.reducer
        if not hasattr(reducer, "_set_optimizer_in_backward"):  # pragma: no cover
            raise RuntimeError("this torch's DistributedDataParallel has no optimizer-in-"
                               "backward mode, which per-layer mode under DDP needs")
        state = _CommState(ddp)
        try:
            ddp.register_comm_hook(state, _comm_hook)
        except RuntimeError as e:
            raise RuntimeError(
                "register_hooks on a DistributedDataParallel model registers a DDP "
                "communication hook, and this model already has one (DDP allows only "
                f"one); per-layer mode cannot be combined with it ({e})") from e
        # the reducer must not write the averaged gradients back into .grad at the end of
        # backward (it would re-create every gradient that step() has freed)
        reducer._set_optimizer_in_backward()
        ddp._lowrank_comm_state = state
    state.steps.append(step)
    return _Handle(state, step)
