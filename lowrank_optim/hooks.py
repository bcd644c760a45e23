"""Per-layer updates fused into backward, for any optimizer of this package.

``handle = opt.register_hooks(model)`` registers, on every parameter of ``model`` that
``opt`` optimizes, a ``Tensor.register_post_accumulate_grad_hook``. When a parameter's
gradient is complete, the hook updates that parameter with ``opt.step_param(p, group)``
and frees its gradient (``p.grad = None``); a parameter used several times in one
forward gets one summed gradient and one step, as autograd accumulates it. Only one
layer's gradient is alive at a time, so peak memory drops by roughly the total gradient size minus the largest
parameter's. It stays one optimizer: ``state_dict``/``load_state_dict``, param groups and
LR schedulers (``scheduler.step()`` once per optimizer step) work unchanged.

``opt.step()`` in this mode never touches a parameter the hooks step (whatever
``accumulation_steps`` is: between micro-batches those keep their partial gradients, and
a stray step used to apply them a second time). It steps only the optimizer's other
parameters that have a gradient: the usual loop (backward, ``opt.step()``,
``zero_grad()``) with hooks registered does what it does without them. A parameter of
the optimizer that no hook steps is one that did not require grad when
``register_hooks`` ran (unfrozen later), was added by ``add_param_group`` afterwards, or
is not in ``model``. Its gradient is never consumed by the hooks, so skipping it
silently would freeze it, and raising would stop a run whose owner may step it with
``opt.step()`` on purpose: the end of the first backward that leaves such parameters a
gradient warns once, naming them (``handle.remove()`` and ``register_hooks`` again
covers them).

Options:

* ``accumulation_steps=N``: gradients accumulate over N backward passes and each
  parameter is stepped on the N-th (scale the loss by 1/N as usual). The gradients are
  then kept between micro-batches, so memory is saved only on the last one.
* ``max_grad_norm_per_param=c``: each parameter's gradient is clipped to norm ``c``
  before its update (``torch.nn.utils.clip_grad_norm_`` on that parameter alone).

What cannot work in this mode raises instead of silently doing nothing:

* global gradient-norm clipping (the total norm is known only when every gradient has
  been produced, and by then most have been applied): ``max_grad_norm=`` raises
  ``ValueError``, pointing to ``max_grad_norm_per_param``. A call of
  ``torch.nn.utils.clip_grad_norm_`` after backward sees no gradients and does nothing.
* ``opt.step(closure)`` raises ``RuntimeError``.

Under ``DistributedDataParallel`` pass the wrapped model, ``opt.register_hooks(ddp_model)``
(hooks on ``ddp_model.module`` would step before the gradient all-reduce and the replicas
would drift apart, as galore-torch's layer-wise mode does):

* each float parameter is stepped by a DDP communication hook right after its gradient
  bucket is averaged (:mod:`lowrank_optim.distributed`), so every rank steps with the
  same gradient and the replicas stay bit-identical (INT8 weights included: their
  gradient is an ordinary ``.grad`` in DDP's buckets);
* gradient accumulation: run the first micro-batches under ``ddp_model.no_sync()`` as
  usual; nothing is stepped there (no all-reduce happens), gradients accumulate in
  ``.grad``, and the parameters are stepped in the synchronized backward. Leave
  ``accumulation_steps=1`` then: under DDP it counts *synchronized* backward passes;
* memory: DDP keeps a flat bucket buffer for every gradient it reduces, for good. With
  the default ``gradient_as_bucket_view=False`` normal stepping holds those buckets plus
  every ``.grad`` (twice the gradient size) after backward; per-layer mode frees each
  ``.grad`` once its bucket is stepped, so at most about one bucket's worth of ``.grad``
  exists beside the buckets: a saving of the gradient size minus the largest bucket
  (``benchmarks/bench_ddp.py``). Not in DDP's first iteration, which reduces every
  gradient in one bucket (DDP rebuilds its buckets in the order the gradients arrived,
  in the second forward). With ``gradient_as_bucket_view=True`` the gradients *are* the
  buckets and nothing more can be freed, in either mode;
* the communication hook cannot be removed (DDP allows one, for good): after
  ``handle.remove()`` it only averages and leaves the gradients in ``.grad`` for normal
  stepping, and another ``register_hooks`` on the same model re-arms it. A DDP model
  that already has a communication hook (fp16 compression, PowerSGD) raises
  ``RuntimeError``. With ``find_unused_parameters=True`` a parameter that no rank used
  in a backward is not stepped, as in normal stepping; parameters that DDP ignores
  (``_ddp_params_and_buffers_to_ignore``) are stepped by plain gradient hooks.

``handle.remove()`` restores normal stepping. ``copy.deepcopy(model)`` does not copy
the hooks (a PyTorch property); register them on the copy.

Under FSDP2 pass the ``fully_shard``-ed model: FSDP2 calls post-accumulate-grad hooks on
the *sharded* parameter after its reduce-scatter, so each parameter is stepped there on
its local slice (:mod:`lowrank_optim.fsdp`), refresh collectives included. Gradient
accumulation: with a reduce-scatter every micro-batch, ``accumulation_steps=N``; with
``model.set_requires_gradient_sync(False)`` on all but the last micro-batch, leave
``accumulation_steps=1`` (FSDP2 reduce-scatters, and calls the hooks, only on the last).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import distributed, fsdp

__all__ = ["register_hooks", "HooksHandle"]


class HooksHandle:
    """What :func:`register_hooks` returns; ``remove()`` undoes it."""

    def __init__(self, optimizer, handles: list, counts: dict, covered: set, names: dict):
        self.optimizer, self._handles, self.counts = optimizer, handles, counts
        self.covered = covered  # the parameters the hooks step; opt.step() skips them
        self._names, self._warned = names, set()

    def _warn_uncovered(self) -> None:
        """At the end of a backward: warn once about the optimizer's parameters that
        have a gradient no hook will consume (see the module docstring)."""
        new = []
        for gi, group in enumerate(self.optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None or p in self.covered or p in self._warned:
                    continue
                self._warned.add(p)
                where = f"param_groups[{gi}]['params'][{i}], shape {tuple(p.shape)}"
                name = self._names.get(p)
                if name is None:
                    new.append(f"{where} (not in the hooked model)")
                else:
                    new.append(f"{name!r} ({where}; it did not require grad or was not in "
                               "the optimizer when register_hooks ran)")
        if new:
            warnings.warn(
                f"{type(self.optimizer).__name__}: parameters with a gradient not stepped by "
                f"the per-layer hooks: {'; '.join(new)}. opt.step() steps them (and leaves "
                "the hooked ones alone); or call handle.remove() and register_hooks again "
                "to cover them", stacklevel=2)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.optimizer._hooks is self:
            self.optimizer._hooks = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def register_hooks(optimizer, model: torch.nn.Module, accumulation_steps: int = 1,
                   max_grad_norm_per_param: Optional[float] = None,
                   max_grad_norm: Optional[float] = None) -> HooksHandle:
    """Step each parameter of ``model`` in backward, as soon as its gradient is ready."""
    if max_grad_norm is not None:
        raise ValueError(
            f"max_grad_norm={max_grad_norm!r}: global gradient-norm clipping cannot work in "
            "per-layer mode (parameters are updated before the total norm is known); use "
            "max_grad_norm_per_param, or normal stepping")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} "
                         "(expected an int >= 1)")
    if max_grad_norm_per_param is not None and not max_grad_norm_per_param > 0:
        raise ValueError(f"Invalid max_grad_norm_per_param: {max_grad_norm_per_param!r} "
                         "(expected > 0)")
    if optimizer._hooks is not None:
        raise RuntimeError("register_hooks was already called on this optimizer; "
                           "call handle.remove() first")
    # group index, not the dict: load_state_dict replaces the group dicts
    group_of = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    params = [p for p in model.parameters() if p in group_of]
    if not params:
        raise ValueError("None of the model's parameters is optimized by this optimizer")
    for name, p in model.named_parameters():  # FSDP2 hooks: on the sharded parameter
        if p in group_of:
            fsdp.check_param(optimizer, p, optimizer.param_groups[group_of[p]], repr(name))
    counts, check_queued = {}, [False]

    def check_uncovered() -> None:
        check_queued[0] = False
        if optimizer._hooks is not None:  # not removed during this backward
            optimizer._hooks._warn_uncovered()

    def step(p: torch.Tensor) -> None:
        """The per-parameter unit: count, clip, step, free."""
        if p not in group_of:  # in a DDP bucket, but optimized by another optimizer
            return
        if not check_queued[0] and optimizer._hooks is not None:
            # once per backward, after its last gradient has been accumulated
            torch.autograd.Variable._execution_engine.queue_callback(check_uncovered)
            check_queued[0] = True
        n = counts.get(p, 0) + 1
        if n < accumulation_steps:
            counts[p] = n
            return
        counts.pop(p, None)
        if max_grad_norm_per_param is not None:
            # torch.nn.utils.clip_grad_norm_ itself, the call of a user's loop, so that both
            # agree bit for bit on every device: it takes the norm with torch._foreach_norm
            # where foreach kernels exist, whose CUDA result can differ in the last bits
            # from torch.linalg.vector_norm's
            torch.nn.utils.clip_grad_norm_([p], max_grad_norm_per_param)
        optimizer.step_param(p, optimizer.param_groups[group_of[p]])
        p.grad = None
        # what torch's LR-scheduler wrapper of opt.step() records: without it the first
        # scheduler.step() warns, wrongly here, that it was called before optimizer.step()
        optimizer._opt_called = True

    handles, grad_hooked, covered = [], set(params), set()
    if distributed.is_ddp(model):
        # stepped by a DDP communication hook after their bucket's all-reduce
        handles.append(distributed.attach_ddp(model, step))
        # parameters that DDP ignores are not reduced: stepped as without DDP
        grad_hooked = {p for name, p in model.module.named_parameters()
                       if name in model.parameters_to_ignore}
        covered = set(params) - grad_hooked  # whatever DDP reduces, the hook steps
    for p in params:
        if p.requires_grad and p in grad_hooked:
            handles.append(p.register_post_accumulate_grad_hook(step))
            covered.add(p)
    names = {p: name for name, p in model.named_parameters()}
    optimizer._hooks = HooksHandle(optimizer, handles, counts, covered, names)
    return optimizer._hooks
