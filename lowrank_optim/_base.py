"""The base optimizer every method of the package derives from.

``LowRankOptimizer`` is a ``torch.optim.Optimizer`` whose ``step`` is a loop over a
per-parameter primitive, ``step_param(p, group)``, which the per-layer hook engine
(:mod:`lowrank_optim.hooks`) calls from backward as well. For each parameter with a
gradient it runs one pipeline:

1. ``g = p.grad`` (negated when ``maximize``); sparse gradients are rejected.
2. If the parameter is *projected* (its group has a ``rank`` and it is a 2-D matrix):
   refresh the basis when the group's refresh policy says so (applying the
   ``state_on_refresh`` policy to the inner state), then ``low = project(g)``.
3. ``d = rule.update(low or g)``: the optimizer's inner rule (a
   :class:`~lowrank_optim.rules.Rule`: Adam, 8-bit Adam, Adafactor), which owns its
   state (created in the low-rank shape; moved along at a basis change).
4. Put back together (:meth:`LowRankOptimizer._put_back_`): ``p ← p·(1 − lr·wd) − lr·u``
   with ``u = scale·project_back(d)`` (projected) or ``u = d``: decoupled weight decay
   and the learning rate in full space, as ``torch.optim.AdamW`` does. A method whose
   update adds a residual or rescales the full gradient (Fira, APOLLO) overrides this
   step (and sets ``needs_full_grad`` to receive the gradient there).

Before any of this, :meth:`LowRankOptimizer.step` checks every gradient: one NaN or Inf
and nothing is changed (a warning, ``skipped_steps``); the per-layer hooks check each
gradient before ``step_param`` (:mod:`lowrank_optim.hooks`).

An FSDP2-sharded parameter (a ``DTensor``) runs the same pipeline on this rank's slices
of the parameter, gradient and state (:func:`lowrank_optim.fsdp.local_view`); its
refresh computes the basis from the whole gradient.

The base knows no rule's state keys and no layer type: a parameter stored in another
form (Q-GaLore's INT8 :class:`~lowrank_optim.nn.QuantWeight`) is updated through its
``dequantize()``/``requantize_()`` (:meth:`LowRankOptimizer._apply`).

State is flat: tensors, ints, floats and lists of floats, so ``state_dict()`` loads with
``torch.load(..., weights_only=True)``. ``torch.optim.Optimizer.load_state_dict`` casts
every state tensor to its parameter's dtype (uint8 codes and float32 bases to bf16 on a
bf16 model); the override here re-reads each tensor from the incoming dict in the dtype
it was saved with. Loading is all or nothing: the groups (this class's options, the
constructor's checks) and every state entry (the keys, shapes and dtypes the rule and the
projector create, valid counters and side) are checked first, so a state dict of another
model or optimizer class, or a bad hand edit, raises ``ValueError`` and changes nothing.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from . import lowrank_backward
from ._checks import (all_finite, check as _check, check_int, is_int, plain,
                      user_stacklevel)
from .rules import Rule
from . import fsdp
from .projector import (BOTH, LEFT, PROJ_TYPES, RIGHT, SVD_METHODS, Projector, choose_side,
                        overlap)
from .refresh import FixedGap

__all__ = ["LowRankOptimizer", "STATE_POLICIES"]

STATE_POLICIES = ("keep", "project", "reset")


class LowRankOptimizer(Optimizer):
    """Base class: validation, lazy state, the project → rule → put back pipeline.

    A method is a composition: a subclass sets ``rule`` (its inner
    :class:`~lowrank_optim.rules.Rule`), passes its ``defaults`` to ``__init__``, and may
    override ``_projector`` (the projector of a group), ``_refresh_policy`` (when a
    basis is refreshed) and ``_put_back_`` (how the update is put back together).

    Attributes: ``skip_nonfinite`` (default True): a step with a NaN/Inf gradient is
    skipped, all or nothing (:meth:`step`; per parameter in per-layer mode); False lets
    the values in, as torch's optimizers do. ``skipped_steps``: how many steps were
    skipped so far (not in ``state_dict``). Why: ``docs/decisions.md`` (Non-finite gradients).
    At construction a rank whose projected state is not smaller than the unprojected
    one warns (``docs/decisions.md``, Rank too large).
    """

    rule: Rule = None
    needs_full_grad = False  # _put_back_ receives the full gradient (else None)
    # skip a step (a parameter's, in per-layer mode) with a NaN/Inf gradient; False: torch's
    # behaviour (the non-finite values enter the parameters and the state)
    skip_nonfinite = True
    skipped_steps = 0  # steps skipped for a NaN/Inf gradient (instance attribute once counted)
    _constructed = False  # __init__ done: a group added later gets its own rank check
    _hooks = None  # the active HooksHandle; a deepcopy or unpickled copy has none
    _group_format = False
    supports_fsdp2 = False  # steps FSDP2-sharded parameters (lowrank_optim.fsdp)
    # an unprojected parameter may be stepped by the rule's fused kernel (Rule.step_full_),
    # bypassing _put_back_; a subclass whose _put_back_ changes unprojected updates sets False
    fused_plain = True

    def __init__(self, params, defaults: dict):
        if not isinstance(params, Tensor):  # a Tensor: torch's TypeError, from super()
            params = list(params)
        self._group_format = isinstance(params, list) and bool(params) and isinstance(
            params[0], dict) and any("rank" in g for g in params)
        super().__init__(params, {k: plain(v) for k, v in defaults.items()})
        self._hooks = None  # set while register_hooks is active
        self.skipped_steps = 0
        self._warn_rank(self.param_groups)
        self._constructed = True

    def __getstate__(self) -> dict:
        # torch's __getstate__ keeps defaults/state/param_groups only; keep the group format
        # too, so a deepcopy adds rank-less groups as plain AdamW like the original does,
        # and the non-finite option and counter
        return {**super().__getstate__(), "_group_format": self._group_format,
                **{k: v for k, v in self.__dict__.items()
                   if k in ("skip_nonfinite", "skipped_steps", "_constructed")}}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True in per-layer mode: ``GradScaler.step`` then hands this optimizer the scale
        and its inf check (``grad_scale``, ``found_inf``) instead of unscaling gradients
        the hooks have already consumed (:func:`lowrank_optim.hooks.register_hooks`,
        ``scaler=``). False in normal mode, where GradScaler unscales and skips as usual."""
        return self._hooks is not None

    # ---- validation ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_group_format", False):
            param_group.setdefault("rank", None)  # galore-torch format: no rank = plain AdamW
        param_group.update({k: plain(v) for k, v in param_group.items() if k != "params"})
        merged = {**self.defaults, **param_group}
        self._validate_group(merged)
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # a generator must survive the checks
            param_group["params"] = params = list(params)
        for i, p in enumerate([params] if isinstance(params, Tensor) else params):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(f"Complex parameters are not supported (got one of dtype "
                                 f"{p.dtype}); optimize torch.view_as_real(p) instead")
            fsdp.check_param(self, p, merged,
                             f"param_groups[{len(self.param_groups)}]['params'][{i}]")
        super().add_param_group(param_group)
        lowrank_backward.bind(self, self.param_groups[-1])  # its GaLoreLinear layers
        if self._constructed:  # else __init__ checks every group at once
            self._warn_rank(self.param_groups[-1:])

    def _validate_group(self, g: dict) -> None:
        lr = g["lr"]
        _check(float(lr) >= 0.0, "learning rate", lr, "lr >= 0")
        _check(g.get("eps", 0.0) >= 0.0, "eps", g.get("eps"), "eps >= 0")
        _check(g["weight_decay"] >= 0.0, "weight_decay", g["weight_decay"], "weight_decay >= 0")
        self.rule.validate(g)
        rank = g.get("rank")
        if rank is not None:
            _check(is_int(rank) and rank > 0, "rank", rank,
                   "a positive int, or None for no projection")
            check_int("update_proj_gap", g["update_proj_gap"])
            _check(g["scale"] > 0, "scale", g["scale"], "scale > 0")
            _check(g["proj_type"] in PROJ_TYPES, "proj_type", g["proj_type"],
                   f"one of {PROJ_TYPES}")
            _check(g["svd"] in SVD_METHODS, "svd", g["svd"], f"one of {SVD_METHODS}")
            _check(g["state_on_refresh"] in STATE_POLICIES, "state_on_refresh",
                   g["state_on_refresh"], f"one of {STATE_POLICIES}")

    def _warn_rank(self, groups: list) -> None:
        """Warn, once for the groups given (all of them at construction, a group added
        later on its own), about projected matrices whose optimizer state at the group's
        rank is at least the same rule's state on the whole matrix (the rank is too large
        for the shape: e.g. rank 128 on a 128-wide matrix), naming each and the largest
        rank that saves memory. Why: ``docs/decisions.md`` (Rank too large)."""
        bad, sizes = [], {}

        def size(p, group, rank):  # matrices of one shape and group share their sizes
            key = (tuple(p.shape), p.dtype, id(group), rank)
            if key not in sizes:
                sizes[key] = self._state_bytes(p, group, rank)
            return sizes[key]

        seen = set()
        for group in groups:
            for p in group["params"]:
                p = self._matrix(p)  # a GaLoreLinear's weight_lowrank: its weight
                if not self.is_projected(p, group) or id(p) in seen:
                    continue
                seen.add(id(p))
                full, r = size(p, group, None), min(group["rank"], *p.shape)
                if size(p, group, r) < full:
                    continue
                lo, hi = 0, r  # the state grows with the rank: the largest rank below `full`
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if size(p, group, mid) < full else (lo, mid)
                bad.append(f"{self._where(p)} at rank {r}: {size(p, group, r) / full:.2f}x; " +
                           (f"rank <= {lo} saves memory" if lo else
                            "no rank saves memory, leave it unprojected (rank=None)"))
        if bad:
            warnings.warn(f"{type(self).__name__}: projection costs at least as much "
                          "optimizer state as the same rule without it on "
                          f"{'; '.join(bad)} (docs/decisions.md, Rank too large)",
                          stacklevel=user_stacklevel())

    def _state_bytes(self, p: Tensor, group: dict, rank: Optional[int]) -> int:
        """Bytes of ``p``'s state at ``rank`` (None: unprojected), from meta tensors."""
        g = {**group, "rank": rank}
        side = None if rank is None else choose_side(p.shape, g["proj_type"])
        return sum(t.numel() * t.element_size()
                   for t in self._declared_state(p, g, side).values())

    # ---- the pipeline -------------------------------------------------------------------
    @staticmethod
    def is_projected(p: Tensor, group: dict) -> bool:
        """True when ``p`` gets low-rank updates: its group has a rank and it is 2-D.
        Other parameters (biases, norms, conv kernels) take the plain inner rule."""
        return group.get("rank") is not None and p.dim() == 2

    def _projector(self, group: dict) -> Projector:
        return Projector(group["rank"], group["proj_type"], group["svd"])

    def _refresh_policy(self, p: Tensor, group: dict):
        return FixedGap(group["update_proj_gap"], self._phase(p, group))

    def _phase(self, p: Tensor, group: dict, prefix: str = "refresh") -> int:
        """Offset of ``p``'s second refresh (``prefix="merge"``: merge) when ``stagger`` is
        on: the matrices are spread evenly over one gap, so their SVDs do not all land on
        the same step."""
        if not group.get("stagger") or self.state[p].get(f"{prefix}_count"):
            return 0  # the phase matters only until the first refresh has been scheduled
        mats = [q for grp in self.param_groups for q in grp["params"]
                if self._staggered(q, grp)]
        i = next(k for k, q in enumerate(mats) if q is p)
        return max(1, round(group["update_proj_gap"] * (i + 1) / len(mats)))

    def _staggered(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` takes part in the stagger (its own schedule of SVDs): a trainable
        projected matrix."""
        return self.is_projected(p, group) and p.requires_grad

    @staticmethod
    def _matrix(p: Tensor) -> Tensor:
        """The matrix ``p``'s updates are written into: ``p``, or the weight of the
        :class:`~lowrank_optim.nn.GaLoreLinear` whose ``weight_lowrank`` is ``p`` (its
        ``.grad`` is then already projected, and its basis is refreshed in backward:
        :mod:`lowrank_optim.lowrank_backward`)."""
        layer = getattr(p, "lowrank_layer", None)
        return p if layer is None else layer.weight

    def _grad(self, p: Tensor, group: dict) -> Tensor:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return -g if group.get("maximize") else g

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """Update one parameter from its ``.grad`` (the unit the hook engine calls)."""
        if p.grad is None:
            return
        projected = self.is_projected(p, group)
        if projected:
            policy = self._refresh_policy(p, group)
        # an FSDP2-sharded p: its local slice, gradient slice and state (lowrank_optim.fsdp)
        with fsdp.local_view(p, self._grad(p, group), self.state[p]) as (p, g, state, shards):
            self._step_local(p, g, group, state, projected and policy, shards)

    def _step_local(self, p: Tensor, g: Tensor, group: dict, state: dict, policy,
                    shards: Optional[fsdp.Shards]) -> None:
        """:meth:`step_param` on plain tensors (``policy``: the refresh policy of a
        projected parameter, else False; ``shards``: how ``p`` is split, or None)."""
        if not state:
            state["step"] = 0
            if not policy:
                self.rule.init(state, p, group)
        proj, target = None, self._matrix(p)
        if (not policy and target is p and self.fused_plain and not hasattr(p, "requantize_")
                and self.rule.step_full_(state, p, g, state["step"] + 1, group)):
            state["step"] += 1  # an unprojected parameter, stepped by one fused kernel
            return
        if policy:
            proj = self._projector(group)
            if policy.due(state, state["step"]):
                if target is not p:  # a low-rank backward refreshes in backward
                    raise p.lowrank_layer.missed_refresh(state["step"])
                self._refresh(p, g, group, state, proj, policy, shards)
        low = g if proj is None or target is not p else proj.project(state, g)
        d = self.rule.update(state, low, state["step"] + 1, group, low_rank=proj is not None)
        state["step"] += 1
        if not self.needs_full_grad:
            g = low = None
            if self._hooks is not None:
                # per-layer mode frees the gradient after this step anyway; freeing it
                # before the write means a stored-quantized weight's float copy never meets it
                p.grad = None
        self._apply(target, d, group, state, proj, g, low)

    def _apply(self, p: Tensor, d: Tensor, group: dict, state: dict,
               proj: Optional[Projector], g: Optional[Tensor] = None,
               low: Optional[Tensor] = None) -> None:
        """Write the update of direction ``d`` into ``p`` (:meth:`_put_back_`).

        A parameter stored in another form (a tensor subclass with ``dequantize()`` and
        ``requantize_(w, stochastic, generator)``, such as
        :class:`~lowrank_optim.nn.QuantWeight`) is dequantized (this parameter only),
        updated in float32 and stored back by the weight type, with stochastic rounding
        when the group's ``stochastic_round`` is true (the default), so updates smaller
        than one quantization step survive on average (Q-GaLore). The rounding noise
        comes from a generator seeded by the group's ``seed``, the parameter's index and
        its step, so a resumed run, and every DDP replica, draws the same noise.
        """
        if not hasattr(p, "requantize_"):
            return self._put_back_(p, d, group, state, proj, g, low)
        w = p.dequantize()
        self._put_back_(w, d, group, state, proj, g, low)
        gen = None
        if group.get("stochastic_round", True):
            if "sr_index" not in state:
                state["sr_index"] = next(i for i, q in enumerate(
                    q for grp in self.param_groups for q in grp["params"]) if q is p)
            seed = (group.get("seed", 0) * 1_000_003 + state["sr_index"]) * 1_000_003
            gen = torch.Generator(device=w.device).manual_seed(
                (seed + state["step"]) % 2 ** 63)
        p.requantize_(w, stochastic=gen is not None, generator=gen)

    def _put_back_(self, w: Tensor, d: Tensor, group: dict, state: dict,
                   proj: Optional[Projector], g: Optional[Tensor],
                   low: Optional[Tensor] = None) -> None:
        """The update put back together in full space, written into ``w``:
        ``w ← w·(1 − lr·wd) − lr·u``, ``u = scale·project_back(d)`` (``proj`` set) or
        ``u = d``: decoupled weight decay and the step, as torch.optim.AdamW.

        Override to change how the update is assembled (Fira: plus a scaled residual
        ``g − project_back(project(g))``; APOLLO: a channel-wise scale of ``g``). When
        the class sets ``needs_full_grad``, ``g`` is the full gradient and ``low`` what the
        rule was given (``project(g)``, or ``g`` when not projected); else both are None.
        """
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            w.mul_(1 - lr * wd)
        if proj is None:
            F.add_(w, d, alpha=-lr)  # float32 d: one rounding into a low-precision w
        else:
            proj.add_back_(state, w, d, alpha=-lr * group["scale"])

    def _refresh(self, p, g, group, state, proj: Projector, policy,
                 shards: Optional[fsdp.Shards] = None) -> None:
        """New basis, then the ``state_on_refresh`` policy on the inner state. ``g`` is
        this rank's slice of a sharded gradient when ``shards`` is set: the basis is
        computed from the whole gradient (:meth:`Projector.refresh`), the state in the
        local shape."""
        count = state.get(f"{policy.prefix}_count", 0)
        if count == 0:  # a placeholder (made for a checkpoint, _init_for_checkpoint)
            proj.clear(state)
        first = not proj.has_basis(state)
        rots = proj.refresh(state, g, seed=count, shards=shards)
        shape = g.shape if shards is None else shards.shape
        low = torch.empty(fsdp.local_shape(proj.low_rank_shape(state, shape), shards, g),
                          device=p.device)
        if first:
            self.rule.init(state, low, group)
        else:
            self._carry_state(state, low, group, group["state_on_refresh"], rots, policy)
        policy.after(state, state["step"], None if rots is None else overlap(rots))

    def _carry_state(self, state: dict, like: Tensor, group: dict, how: str,
                     rots: Optional[tuple], policy) -> None:
        """The inner state after a basis change with rotations ``rots`` (``None``: the
        basis was kept): ``keep`` leaves it, ``reset`` re-initialises it (bias correction
        restarts: ``step`` and the policy's next event are rebased), ``project`` lets the
        rule rotate its moments (:meth:`Projector.transport`; second moments with squared
        rotations)."""
        if rots is None or how == "keep":
            return
        if how == "reset":
            self.rule.init(state, like, group)
            state[f"{policy.prefix}_next"] -= state["step"]
            state["step"] = 0
            return
        self.rule.transport_(state, lambda v, squared: Projector.transport(v, rots, squared))

    # ---- torch.optim.Optimizer API ------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; returns the closure's loss.

        All or nothing: every gradient is checked first (one fused pass and one host
        sync), and if any is NaN or Inf nothing is changed: no parameter, no state, no
        ``step`` count, so the refresh and merge schedules do not advance either; the
        optimizer warns, naming the parameter, and counts the step in ``skipped_steps``
        (``skip_nonfinite = False`` restores torch's behaviour: the values go in). Under a
        ``GradScaler`` an overflow never gets here: ``scaler.step`` skips the call, and
        lowers the scale, without a warning. Why: ``docs/decisions.md`` (Non-finite
        gradients).

        In per-layer mode the closure (whose backward performs the updates) is run and its
        loss returned, so training loops that always pass one (Lightning) work; the
        parameters the hooks step are skipped here (a true no-op for them, see
        :mod:`lowrank_optim.hooks`) and the others are stepped as above."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif self.supports_fsdp2 and fsdp.is_checkpoint_init(self):
            self._init_for_checkpoint()
            return None
        hooked = self._hooks.covered if self._hooks is not None else frozenset()
        todo = [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and p not in hooked]
        if self._hooks is not None and self._hooks.scaler_step(todo):
            return loss  # GradScaler found an overflow in these gradients: it reports it
        dense = [p for p, _ in todo if not p.grad.is_sparse]  # sparse: step_param raises
        grads = [fsdp.local(p.grad) for p in dense]  # FSDP2: this rank's slices, then
        if self.skip_nonfinite and not fsdp.agree(all_finite(grads), dense):  # all ranks'
            self.skipped_steps += 1
            bad = next((p for p, g in zip(dense, grads) if not all_finite([g])), None)
            where = "another rank's slice" if bad is None else self._where(bad)
            warnings.warn(f"{type(self).__name__}: step skipped, non-finite gradient in "
                          f"{where} (nothing was updated; "
                          f"skipped_steps={self.skipped_steps})", RuntimeWarning,
                          stacklevel=user_stacklevel())
            return loss
        for p, group in todo:
            self.step_param(p, group)
        return loss

    def _where(self, p: Tensor) -> str:
        """``p`` as its place in the optimizer and its shape, for messages."""
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"

    def _init_for_checkpoint(self) -> None:
        """The state ``torch.distributed.checkpoint`` asks a fresh optimizer for (its
        ``_init_optim_state`` calls ``step()`` with zero gradients and lr 0): every
        entry a trained optimizer has, so that ``dcp.load`` fills them all, but no step
        taken (``step`` 0) and no basis: a projected matrix gets zero placeholders and a
        refresh count of 0, so its next real step computes its first basis (the refresh
        schedule, stagger included, starts there). Plain parameters get zero moments."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                projected = self.is_projected(p, group)
                policy = self._refresh_policy(p, group) if projected else None
                with fsdp.local_view(p, None, self.state[p]) as (w, _, state, shards):
                    state["step"] = 0
                    if policy is None:
                        self.rule.init(state, w, group)
                        continue
                    proj, (m, n) = self._projector(group), self._matrix(p).shape
                    side, r = choose_side((m, n), group["proj_type"]), min(proj.rank, m, n)
                    state["proj_side"] = side
                    proj._store(state, "proj", w.new_zeros(n if side == RIGHT else m, r,
                                                           dtype=torch.float32))
                    if side == BOTH:
                        proj._store(state, "proj_right", w.new_zeros(n, r, dtype=torch.float32))
                    low = torch.empty(fsdp.local_shape(proj.low_rank_shape(state, p.shape),
                                                       shards, w), device=w.device)
                    self.rule.init(state, low, group)
                    state[f"{policy.prefix}_next"] = state[f"{policy.prefix}_count"] = 0

    def basis(self, p: Tensor) -> Optional[Tensor]:
        """The current float32 basis of a projected parameter (``U_r``, m×r, for a left
        or two-sided projection; ``V_r``, n×r, for a right one; dequantized when stored
        quantized), or ``None`` before its first refresh or for a plain parameter."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self.state.get(p, {})
        if not self.is_projected(p, group) or "proj_side" not in state \
                or state.get("refresh_count") == 0:  # none, or a checkpoint's placeholder
            return None
        left, right = self._projector(group).bases(state, self._matrix(p))
        return left if left is not None else right

    def register_hooks(self, model: torch.nn.Module, **kwargs):
        """Per-layer updates fused into backward; see :func:`lowrank_optim.hooks.register_hooks`."""
        from .hooks import register_hooks

        return register_hooks(self, model, **kwargs)

    # ---- loading ------------------------------------------------------------------------
    # the scalars a state may hold: name -> least value of an int (lists: the similarity queue)
    _SCALARS = {"step": 0, "sr_index": 0, "refresh_next": 0, "refresh_count": 0,
                "refresh_gap": 1, "merge_next": 0, "merge_count": 0, "refresh_sims": list}

    def _declared_state(self, p: Tensor, group: dict, side: Optional[int]) -> dict:
        """The state tensors of ``p`` as this optimizer creates them (meta tensors: key,
        shape and dtype): the rule's, on the low-rank shape with the basis of ``side`` for
        a projected matrix (nothing before its first refresh, ``side`` None), else on ``p``."""
        out, meta = {}, dict(device="meta")
        if not self.is_projected(p, group):
            self.rule.init(out, torch.empty(p.shape, dtype=p.dtype, **meta), group)
        elif side is not None:
            proj, (m, n) = self._projector(group), self._matrix(p).shape
            r = min(proj.rank, m, n)
            proj._store(out, "proj", torch.empty((n if side == RIGHT else m, r), **meta))
            if side == BOTH:
                proj._store(out, "proj_right", torch.empty((n, r), **meta))
            low = proj.low_rank_shape({"proj_side": side}, p.shape)
            self.rule.init(out, torch.empty(low, **meta), group)
        return out

    def _check_state(self, pos: int, p: Tensor, group: dict, st: dict) -> dict:
        """Raise ``ValueError`` unless ``st`` is a state this optimizer could have made for
        ``p`` (parameter ``pos`` in the file); returns its declared tensors."""
        def bad(key, found, allowed):
            raise ValueError(f"{type(self).__name__} cannot load this state dict: parameter "
                             f"{pos} (shape {tuple(p.shape)}) has state {key!r} = {found}, "
                             f"expected {allowed}")
        side = st.get("proj_side")
        if "proj_side" in st and not (self.is_projected(p, group) and side in (LEFT, RIGHT, BOTH)):
            bad("proj_side", repr(side), "one of 0, 1, 2 (left, right, both) on a projected "
                "matrix" if self.is_projected(p, group) else "none (not projected here)")
        if side is not None and self._matrix(p) is not p and side != p.lowrank_layer.side:
            bad("proj_side", repr(side), f"{p.lowrank_layer.side}, the side of its GaLoreLinear")
        declared = self._declared_state(p, group, side) if st else {}
        for key, v in st.items():
            least = self._SCALARS.get(key)
            if key == "proj_side" or key in declared:
                continue
            if least is list:
                if not (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)):
                    bad(key, repr(v), "a list of floats")
            elif least is None:
                bad(key, f"a {type(v).__name__}", f"no such entry (the state tensors here: "
                    f"{sorted(declared)}; another optimizer's state?)")
            elif not (is_int(v) and v >= least):
                bad(key, repr(v), f"an int >= {least}")
        if st and "step" not in st:
            bad("step", "missing", "an int >= 0")
        for key, d in declared.items():
            v = st.get(key)
            if not isinstance(v, Tensor):
                bad(key, "missing" if v is None else repr(v), f"a tensor of shape "
                    f"{tuple(d.shape)} and dtype {d.dtype}")
            if v.shape != d.shape:
                raise ValueError(f"state dict does not match this model: parameter {pos} "
                                 f"(shape {tuple(p.shape)}) has state {key!r} of shape "
                                 f"{tuple(v.shape)}, expected {tuple(d.shape)}")
            if v.dtype != d.dtype and not (v.is_floating_point() and d.is_floating_point()):
                bad(key, f"a tensor of dtype {v.dtype}", f"dtype {d.dtype}")
        return declared

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer class, all or nothing: every param group
        must carry this class's options and pass the constructor's checks, and every state
        entry must be one this optimizer could have made for its parameter (the rule's and
        the projector's tensors, of their shapes and dtypes, and valid counters); else
        ``ValueError`` naming the group or parameter, the key, the value found and what is
        allowed, and nothing is changed. A float tensor is loaded in the dtype this optimizer
        creates it in (torch casts every state tensor to its parameter's dtype)."""
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        owner, pos = {}, 0
        for i, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            missing = sorted(set(self.defaults) - set(sg))
            if missing:
                raise ValueError(f"{name} cannot load this state dict: param group {i} has no "
                                 f"{', '.join(map(repr, missing))} (its options: "
                                 f"{sorted(k for k in sg if k != 'params')}): the state dict "
                                 f"of another optimizer class?")
            merged = {**g, **{k: v for k, v in sg.items() if k != "params"}}
            try:
                self._validate_group(merged)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{name} cannot load this state dict: param group {i}: "
                                 f"{exc}") from None
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"loaded state dict has {len(sg['params'])} parameters in "
                                 f"group {i}, this optimizer has {len(g['params'])}")
            for idx, p in zip(sg["params"], g["params"]):
                owner[idx] = (p, merged, pos)
                pos += 1
        declared = {idx: self._check_state(pos, p, merged, state_dict["state"][idx])
                    for idx, (p, merged, pos) in owner.items() if idx in state_dict["state"]}
        super().load_state_dict(state_dict)
        for idx, dec in declared.items():
            p = owner[idx][0]
            mine = self.state[p]
            for key, d in dec.items():
                if mine[key].dtype != d.dtype:  # torch cast it to the parameter's dtype
                    mine[key] = state_dict["state"][idx][key].to(p.device, d.dtype, copy=True)
