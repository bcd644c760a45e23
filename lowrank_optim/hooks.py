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
* ``scaler=``: the ``torch.amp.GradScaler`` of a mixed-precision loop
  (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``, unchanged). Each
  gradient is unscaled before its update (GradScaler's own kernel and ``1/scale``, so
  the result is normal mode's with the same scaler, bit for bit); a gradient that
  overflowed (NaN/Inf after unscaling) skips that parameter's update, all or nothing,
  and is reported at ``scaler.step(opt)``, so ``scaler.update()`` lowers the scale, as
  in normal mode and without a warning. Only the overflowing parameters are skipped: the
  others were stepped earlier in the same backward (normal mode skips the whole step).
  This optimizer tells GradScaler, in per-layer mode only, that it handles the scaling
  itself (``_step_supports_amp_scaling``, as torch's fused optimizers do), so
  ``scaler.step(opt)`` hands it the scale and the inf check of the gradients left for
  ``opt.step()``; without ``scaler=`` that call raises ``RuntimeError`` (the hooks have
  already stepped with scaled gradients). Lightning's AMP plugin reads the same flag:
  it leaves the unscaling to the optimizer and refuses ``gradient_clip_val``.

Each gradient is checked before its update (one fused pass and one host sync per
parameter; :meth:`~lowrank_optim._base.LowRankOptimizer.step` has the normal-mode
rule): without a scaler, a NaN/Inf gradient skips that parameter's update (its value,
state and ``step`` count stay as they were, so its refresh schedule does not advance),
its gradient is freed, and the end of the backward warns once, naming the skipped
parameters, and adds one to ``opt.skipped_steps``. ``opt.skip_nonfinite = False`` turns
the check off (torch's behaviour: the values go in; no sync). Why:
``docs/decisions.md`` (Non-finite gradients).

``opt.step(closure)`` runs the closure, whose backward performs the updates, and returns
its loss (training frameworks that always pass one, such as Lightning's automatic
optimization, work unchanged); it then steps the parameters no hook steps, as
``opt.step()`` does.

What cannot work in this mode raises or warns instead of silently doing nothing:

* global gradient-norm clipping (the total norm is known only when every gradient has
  been produced, and by then most have been applied): ``max_grad_norm=`` raises
  ``ValueError``, pointing to ``max_grad_norm_per_param``. A global clip after backward
  (``torch.nn.utils.clip_grad_norm_``, HF Trainer's ``max_grad_norm``, Lightning's
  ``gradient_clip_val``) sees no gradients and does nothing: the end of the first
  backward without ``max_grad_norm_per_param`` warns once per ``register_hooks`` (a
  ``UserWarning`` whose message starts with the optimizer's name and "in per-layer
  mode"; filter it if you do not clip).
* a parameter that receives no gradient in a backward is not stepped, whatever
  ``zero_grad(set_to_none=...)`` did: its hook never fires. Normal stepping after
  ``zero_grad(set_to_none=False)`` steps it with a zero gradient (its moments decay and
  it moves by momentum, as in ``torch.optim.AdamW``); per-layer mode behaves as
  ``set_to_none=True``, torch's default.

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
  (``_ddp_params_and_buffers_to_ignore``) are stepped by plain gradient hooks;
* ``scaler=`` works the same: each rank unscales and checks the *averaged* gradient, so
  every rank skips the same parameters and reports the same overflow.

``handle.remove()`` restores normal stepping. ``copy.deepcopy(model)`` does not copy
the hooks (a PyTorch property); register them on the copy. The optimizer and the model
pickle with hooks active (the copies have none); the handle itself refuses to
(``TypeError``).

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
from ._checks import nonfinite_, user_stacklevel

__all__ = ["register_hooks", "HooksHandle"]


class HooksHandle:
    """What :func:`register_hooks` returns; ``remove()`` undoes it."""

    def __init__(self, optimizer, handles: list, counts: dict, covered: set, names: dict,
                 scaler=None, max_grad_norm_per_param: Optional[float] = None):
        self.optimizer, self._handles, self.counts = optimizer, handles, counts
        self.covered = covered  # the parameters the hooks step; opt.step() skips them
        self.scaler, self.max_grad_norm_per_param = scaler, max_grad_norm_per_param
        self._names, self._warned = names, set()
        self._queued = None  # the backward (graph task) whose end callback is queued
        self._skipped = []  # parameters skipped in this backward for a NaN/Inf gradient
        self._overflow = False  # a scaled gradient overflowed since the last scaler.step
        self._clip_warned = max_grad_norm_per_param is not None

    def __reduce__(self):
        raise TypeError("a HooksHandle cannot be pickled (it holds the hooks' functions): "
                        "pickle the optimizer and the model, and call register_hooks again")

    def _step(self, p: torch.Tensor, group: dict) -> None:
        """The per-parameter unit once the gradient is complete: unscale and check it,
        clip, step, free (see the module docstring)."""
        if self._finite(p):
            if self.max_grad_norm_per_param is not None:
                # torch.nn.utils.clip_grad_norm_ itself, the call of a user's loop, so that
                # both agree bit for bit on every device: it takes the norm with
                # torch._foreach_norm where foreach kernels exist, whose CUDA result can
                # differ in the last bits from torch.linalg.vector_norm's
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm_per_param)
            self.optimizer.step_param(p, group)
        p.grad = None
        # what torch's LR-scheduler wrapper of opt.step() records: without it the first
        # scheduler.step() warns, wrongly here, that it was called before optimizer.step()
        self.optimizer._opt_called = True

    def _finite(self, p: torch.Tensor) -> bool:
        """Unscale ``p.grad`` (with a scaler) and tell whether it is finite (one fused pass,
        one host sync); a non-finite one is recorded for the scaler, or for the warning at
        the end of the backward. Without a scaler and with ``skip_nonfinite = False``: no
        check (torch's behaviour)."""
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        if (scaler is None and not self.optimizer.skip_nonfinite) or p.grad.is_sparse:
            return True
        inv = None
        if scaler is not None:
            scale = scaler._get_scale_async()  # GradScaler's scale tensor: no host sync
            if scale is None:
                raise RuntimeError("register_hooks(..., scaler=scaler): the gradients are not "
                                   "scaled; call scaler.scale(loss).backward()")
            inv = scale.double().reciprocal().float()  # as GradScaler.unscale_
        # FSDP2: this rank's slice, then every rank's verdict, so all skip alike
        if fsdp.agree(not nonfinite_([fsdp.local(p.grad)], inv).item(), [p]):
            return True
        if scaler is not None:
            self._overflow = True  # reported at scaler.step(opt); no warning (as torch)
        else:
            self._skipped.append(p)
        return False

    def _queue_end_of_backward(self) -> None:
        # once per backward, after its last gradient is accumulated (keyed on autograd's
        # graph task, so a backward that raised half-way does not block the next ones)
        task = torch._C._current_graph_task_id()
        if self._queued != task:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = task

    def _end_of_backward(self) -> None:
        if self.optimizer._hooks is not self:  # removed during this backward
            return
        self._warn_uncovered()
        opt = self.optimizer
        if self._skipped:
            opt.skipped_steps += 1
            where = ", ".join(opt._where(p) for p in self._skipped)
            self._skipped = []
            warnings.warn(f"{type(opt).__name__}: non-finite gradient: the update of {where} "
                          "was skipped in this backward (the other parameters were stepped; "
                          f"skipped_steps={opt.skipped_steps})", RuntimeWarning,
                          stacklevel=user_stacklevel())
        if not self._clip_warned:
            self._clip_warned = True
            warnings.warn(
                f"{type(opt).__name__} in per-layer mode: each gradient is freed as soon as "
                "its parameter is stepped, so a global clip after backward "
                "(torch.nn.utils.clip_grad_norm_, HF Trainer's max_grad_norm, Lightning's "
                "gradient_clip_val) sees no gradients and clips nothing; pass "
                "register_hooks(..., max_grad_norm_per_param=c) to clip each gradient, or "
                "ignore this warning if you do not clip", stacklevel=user_stacklevel())

    def scaler_step(self, todo: list) -> bool:
        """Called by ``opt.step()`` with the parameters it is about to step (those no hook
        steps): when ``GradScaler.step(opt)`` is the caller (it sets ``opt.grad_scale`` and
        ``opt.found_inf``, the contract of torch's fused optimizers), unscale their
        gradients, report the hooks' overflows since the last call to the scaler (so that
        ``scaler.update()`` lowers the scale) and return whether their own gradients
        overflowed (then ``opt.step()`` skips them)."""
        opt = self.optimizer
        if not hasattr(opt, "found_inf"):
            return False  # a plain opt.step()
        if self.scaler is None:
            raise RuntimeError(
                f"GradScaler.step() on a {type(opt).__name__} in per-layer mode registered "
                "without its scaler: the hooks stepped with scaled gradients and could not "
                "skip an overflow; call handle.remove(), then "
                "opt.register_hooks(model, scaler=scaler)")
        if opt.grad_scale is not None:  # None: scaler.unscale_(opt) has unscaled them
            # GradScaler's kernel and 1/scale, as its own unscale_ (found_inf has the check)
            nonfinite_([fsdp.local(p.grad) for p, _ in todo if not p.grad.is_sparse],
                       opt.grad_scale.double().reciprocal().float())
        scale = self.scaler._get_scale_async()
        found = torch.full((), float(self._overflow), device=scale.device)
        self._overflow = False
        # GradScaler keeps each optimizer's inf checks here; update() sums them all
        per_device = self.scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
        per_device[scale.device] = per_device.get(scale.device, 0) + found
        return bool(opt.found_inf)

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
                "to cover them", stacklevel=user_stacklevel())

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
                   max_grad_norm: Optional[float] = None, scaler=None) -> HooksHandle:
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
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"Invalid scaler: {type(scaler).__name__} (expected a "
                        "torch.amp.GradScaler or None)")
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
    counts = {}

    def step(p: torch.Tensor) -> None:
        """The per-parameter unit: count, then (the N-th time) unscale, check, clip, step,
        free."""
        if p not in group_of:  # in a DDP bucket, but optimized by another optimizer
            return
        handle._queue_end_of_backward()
        n = counts.get(p, 0) + 1
        if n < accumulation_steps:
            counts[p] = n
            return
        counts.pop(p, None)
        handle._step(p, optimizer.param_groups[group_of[p]])

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
    handle = HooksHandle(optimizer, handles, counts, covered, names, scaler,
                         max_grad_norm_per_param)
    optimizer._hooks = handle
    return handle
