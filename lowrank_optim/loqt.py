"""LoQT: low-rank adapters for quantized training (Loeschcke et al., NeurIPS 2024)."""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import distributed, quant, rules
from ._layers import (Float32Tensors, layer_by_key, plain_linear, register_layer,
                      swap_linears)
from ._base import STATE_POLICIES, LowRankOptimizer
from ._checks import check as _check, is_int
from .projector import RIGHT, Projector, choose_side
from .refresh import Exponential

__all__ = ["LoQTAdamW", "LoQTAdamW8bit", "LoQTLinear", "prepare_loqt"]


def _owner(p: Tensor):
    """The :class:`~lowrank_optim.nn.LoQTLinear` whose factor ``B`` is ``p``, or None."""
    return getattr(p, "loqt_owner", None)


class _LoQT:
    """The merge schedule around an Adam inner rule (mixed into the two optimizers)."""

    def _validate_group(self, g: dict) -> None:
        if g.get("rank") is not None:
            raise ValueError(f"Invalid rank: {g['rank']!r} ({type(self).__name__} projects "
                             "nothing itself: the rank is prepare_loqt's; leave rank unset)")
        super()._validate_group(g)
        for name, lo in (("update_proj_gap", 1), ("ec_iters", 0), ("max_proj_gap", 1)):
            v = g[name]
            if name == "max_proj_gap" and v is None:
                continue
            _check(is_int(v) and v >= lo, name, v,
                   f"an int >= {lo}" + (" or None" if name == "max_proj_gap" else ""))
        _check(g["increment_size"] >= 1, "increment_size", g["increment_size"], "a float >= 1")
        _check(g["state_on_merge"] in STATE_POLICIES, "state_on_merge", g["state_on_merge"],
               f"one of {STATE_POLICIES}")

    def _merge_policy(self, p: Tensor, group: dict) -> Exponential:
        return Exponential(group["update_proj_gap"], group["increment_size"],
                           group["max_proj_gap"], prefix="merge",
                           phase=self._phase(p, group, prefix="merge"))

    def _staggered(self, p: Tensor, group: dict) -> bool:
        return _owner(p) is not None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._arm(self.param_groups[-1])

    def _arm(self, group: dict) -> None:
        """Arm each layer whose merge is due at its next step: its next backward captures
        the basis (see :class:`~lowrank_optim.nn.LoQTLinear`)."""
        for p in group["params"]:
            if (layer := _owner(p)) is not None:
                state = self.state.get(p, {})
                self._set_capture(p, layer, group, state, state.get("step", 0))

    def _set_capture(self, p: Tensor, layer, group: dict, state: dict, step: int) -> None:
        due = self._merge_policy(p, group).due(state, step)
        layer.capture = (-1 if group["maximize"] else 1) if due else 0

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        layer = _owner(p)
        if layer is None or p.grad is None:
            return super().step_param(p, group)
        state, policy = self.state[p], self._merge_policy(p, group)
        if not state:
            state["step"] = 0
            self.rule.init(state, p, group)
        if policy.due(state, state["step"]):
            if layer.merge_ready:
                rots = layer.merge_(group["ec_iters"])
                self._carry_state(state, p, group, group["state_on_merge"], rots, policy)
                policy.after(state, state["step"])
            elif not getattr(self, "_warned_wait", False):
                self._warned_wait = True  # once per optimizer
                why = ("no gradient was captured: run backward after creating the optimizer"
                       if layer._pending is None else "its captured gradient was not finite")
                warnings.warn(f"{type(self).__name__}: the merge due at step {state['step']} "
                              f"waits for the next backward pass ({why})", stacklevel=3)
        layer._pending = None  # captured for this step only
        super().step_param(p, group)
        self._set_capture(p, layer, group, state, state["step"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; also drops what the layers' armed
        backward captured for a step that was not taken (a GradScaler skip), so the next
        step's merge takes its basis from its own gradient."""
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if (layer := _owner(p)) is not None:
                    layer._pending = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if (layer := _owner(p)) is not None:
                    layer._pending = None
            self._arm(group)


def _loqt_defaults(lr, betas, eps, weight_decay, update_proj_gap, increment_size,
                   max_proj_gap, ec_iters, state_on_merge, stagger, maximize,
                   **extra) -> dict:
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=None,
                update_proj_gap=update_proj_gap, increment_size=increment_size,
                max_proj_gap=max_proj_gap, ec_iters=ec_iters, state_on_merge=state_on_merge,
                stagger=stagger, maximize=maximize, **extra)


class LoQTAdamW(_LoQT, LowRankOptimizer):
    rule = rules.Adam()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, update_proj_gap: int = 100,
                 increment_size: float = 1.2, max_proj_gap: Optional[int] = None,
                 ec_iters: int = 5, state_on_merge: str = "reset", stagger: bool = True,
                 *, maximize: bool = False):
        super().__init__(params, _loqt_defaults(
            lr, betas, eps, weight_decay, update_proj_gap, increment_size, max_proj_gap,
            ec_iters, state_on_merge, stagger, maximize))


class LoQTAdamW8bit(_LoQT, LowRankOptimizer):
    rule = rules.Adam8bit()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, update_proj_gap: int = 100,
                 increment_size: float = 1.2, max_proj_gap: Optional[int] = None,
                 ec_iters: int = 5, state_on_merge: str = "reset", stagger: bool = True,
                 min_8bit_size: int = 4096, *, maximize: bool = False):
        super().__init__(params, _loqt_defaults(
            lr, betas, eps, weight_decay, update_proj_gap, increment_size, max_proj_gap,
            ec_iters, state_on_merge, stagger, maximize, min_8bit_size=min_8bit_size))


LoQTAdamW.__doc__ = r"""LoQT: train only :math:`B` in :math:`W = \mathrm{deq}(Q) + s\,P B`,
merging into the quantized weight at exponentially growing intervals.

Use with a model prepared by :func:`lowrank_optim.prepare_loqt`, which swaps the target
Linear layers for :class:`~lowrank_optim.nn.LoQTLinear` (side rule, storage and forward
are described there). Every other trainable parameter (embeddings, norms, head, biases)
gets plain ``torch.optim.AdamW``. For each LoQT layer, with :math:`G_t` its dense weight
gradient, :math:`\eta` = ``lr``, :math:`s` the layer's scale, :math:`\tau` =
``update_proj_gap``, :math:`\psi` = ``increment_size``:

.. math::
    \begin{aligned}
    &\textbf{merge steps}: t_0 = 0,\ t_1 = \tau\ (\text{or } \phi_i),\
      t_{k+1} = t_k + \tau + \lfloor\psi^k\rfloor
      \quad (\text{each gap capped at ``max\_proj\_gap``}) \\
    &\textbf{if } t = t_k:\quad W \leftarrow \mathrm{deq}(Q) + s\,P B;\quad
      P \leftarrow \mathrm{Q}_P(\text{top-}r \text{ singular vectors of } G_t);\\
    &\qquad (Q, B) \leftarrow \text{error compensation: best of } C \text{ rounds of }
      Q = \mathrm{Q}(W - s P B),\ B = P^{+}(W - \mathrm{deq}(Q))/s \\
    &g_t = \partial L/\partial B = s\,P^\top G_t \ (\text{or } s\,G_t P)
      \text{, with the current } P \\
    &B \leftarrow (1 - \eta\lambda) B - \eta\,\mathrm{Adam}(g_t)
    \end{aligned}

Between merges this is one-sided GaLore with a fixed basis: with quantization off,
:math:`\mathrm{deq}(Q) + sPB` follows :class:`GaLoreAdamW` (``scale`` :math:`s`, ``eps``
:math:`\epsilon/s`, no weight decay) refreshed at the same steps.

The schedule is driven by each factor's own step count (``state["step"]``), not by
counting forward passes, so gradient accumulation, per-layer hooks and checkpoints
need no extra bookkeeping. The gradient for a new :math:`P` is the merge step's own:
the optimizer arms the layers due at their next step, and each layer's backward forms
its dense gradient once (first micro-batch), takes the SVD right there and frees it, so
at most one layer's dense gradient exists at a time (the reference keeps all of them).
The merge step's update of :math:`B` then uses the gradient in the *new* basis, as
GaLore does at a refresh (the reference skips that update or applies a stale one). A
merge that comes due without a captured gradient (no backward since the optimizer was
made), or whose captured gradient was not finite, waits for the next backward pass, with
a warning.

With ``torch.amp.GradScaler`` (``scaler.scale(loss).backward(); scaler.step(opt);
scaler.update(); opt.zero_grad()``): the basis is the same for the scaled gradient as
for the unscaled one (singular vectors do not depend on a positive factor), and a
non-finite gradient in an armed backward does not raise there; it is recorded, and
:math:`\partial L/\partial B` comes out non-finite with it, so the scaler skips the
step. A skipped step calls nothing here: weights, :math:`Q`, :math:`P`, :math:`B`, the
moments and every counter stay as they were, and what the backward captured belongs to
that step only (``zero_grad`` drops it), so the next good step merges as scheduled with
the basis of its own gradient. In per-layer mode the same holds as long as the hooks do
not call ``step_param`` for a parameter whose gradient is not finite (a stale capture is
dropped at the next step's first backward, when ``B.grad`` is empty).

Moments of :math:`B` at a merge (``state_on_merge``): ``"keep"`` (the reference: reused
as they are), ``"project"`` (rotated into the new basis with :math:`P_{old}^\top
P_{new}`, as :class:`GaLoreAdamW`'s ``state_on_refresh="project"``) or ``"reset"``
(zeroed, bias correction restarted; the default, chosen by measurement:
``docs/decisions.md``, Moments at a basis change).

Args:
    params: parameters or param groups; a LoQT model's ``parameters()`` (the factors
        ``B`` and every unwrapped parameter).
    lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (``weight_decay``
        defaults to 0, LoQT's setting; it decays :math:`B`, not :math:`Q`).
    update_proj_gap (int): :math:`\tau`, first interval between merges. Default 100.
    increment_size (float): :math:`\psi \ge 1`. Default 1.2.
    max_proj_gap (int or None): cap on each interval (not on the step positions, as in
        the reference). Default None.
    ec_iters (int): :math:`C`, error-compensation rounds; 0 quantizes the merged weight
        and sets :math:`B = 0`. Default 5.
    state_on_merge (str): ``"keep"``, ``"project"`` or ``"reset"``. Default ``"reset"``.
    stagger (bool): layer :math:`i` of :math:`N` makes its second merge at
        :math:`\phi_i = \lceil \tau (i+1)/N \rfloor` instead of :math:`\tau` (the gaps
        after it are the same), so after the first step the layers' merges and SVDs are
        spread out instead of all landing on one step. ``False`` is the reference's
        schedule. Default True, by measurement (``docs/decisions.md``, Stagger).

Example:
    >>> import torch, lowrank_optim as lo
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    >>> model = lo.prepare_loqt(model, rank=16, target_modules=None)
    >>> opt = lo.LoQTAdamW(model.parameters(), lr=1e-2)
    >>> model(torch.randn(4, 64)).square().mean().backward(); opt.step(); opt.zero_grad()

Reference: S. B. Loeschcke et al., "LoQT: Low-Rank Adapters for Quantized Pretraining",
NeurIPS 2024, https://arxiv.org/abs/2405.16528. Reference settings: lr 0.01, rank
128/256/256/512 for 60M/130M/350M/1B, scale 0.25–0.5, NF4 weights and projections.
"""

LoQTAdamW8bit.__doc__ = """:class:`LoQTAdamW` with 8-bit blockwise moments for tensors of at
least ``min_8bit_size`` elements (as :class:`GaLoreAdamW8bit`)."""


# ---- the layer ------------------------------------------------------------------------


class _Spec(NamedTuple):
    """What the autograd function needs besides tensors (static per layer, so
    ``torch.compile`` specializes on it)."""

    out_features: int
    in_features: int
    side: int
    scale: float
    bits: Optional[int]       # None: an unquantized float weight
    group_size: int
    fmt: str                  # "nf4" or "asym"
    rank: int
    proj_bits: Optional[int]  # None: a float basis
    proj_group_size: int
    names: tuple              # the buffers holding Q and P, in the order they are passed
    key: int                  # the layer's key (_layers.register_layer)

    def base_weight(self, bufs: tuple, dtype: torch.dtype) -> Tensor:
        """``deq(Q)``, ``out × in``, from the buffers named ``names``."""
        store = dict(zip(self.names, bufs))
        if self.bits is None:
            return store["weight"].to(dtype)
        return quant.get(store, "weight", (self.out_features, self.in_features), self.bits,
                         self.group_size, self.fmt).dequantize(dtype)

    def projection(self, bufs: tuple, dtype: torch.dtype) -> Tensor:
        """``deq(P)``, ``min(m, n) × rank``, from the buffers named ``names``."""
        store = dict(zip(self.names, bufs))
        if self.proj_bits is None:
            return store["proj"].to(dtype)
        return quant.get(store, "proj", (min(self.out_features, self.in_features), self.rank),
                         self.proj_bits, self.proj_group_size, "asym").dequantize(dtype)


@torch.library.custom_op("lowrank_optim::loqt_grad_b", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _grad_b(d2: Tensor, x2: Tensor, p: Tensor, key: int) -> Tensor:
    """``∂L/∂B`` of layer ``key`` from ``∂L/∂y`` and ``x`` (flattened to 2-D) in basis ``p``;
    while the layer is armed for a merge, in the new basis it captures first
    (:meth:`LoQTLinear._capture`).

    A custom op, so that ``torch.compile`` keeps this call (and the capture's SVD, its
    quantization and its Python state) opaque inside the compiled backward, whether the
    layer is armed or not: no graph break, no recompilation at merges. It runs Python at
    every call, so it is tagged unsafe for CUDA graphs (``mode="reduce-overhead"``
    leaves it out of the graphs it records, rather than replaying a capture that never
    runs)."""
    layer = layer_by_key(key)
    new = layer._capture(d2, x2)
    if new is not None:
        p = new.to(p.dtype)
    return layer.scale * (d2.T @ (x2 @ p) if layer.side == RIGHT else (d2 @ p).T @ x2)


@_grad_b.register_fake
def _(d2, x2, p, key):
    m, n, r = d2.shape[1], x2.shape[1], p.shape[1]
    return d2.new_empty((m, r) if choose_side((m, n), "std") == RIGHT else (r, n))


class _Pending(NamedTuple):
    """What an armed backward captured: the projector state with the new basis and the
    rotations from the old one (``state`` None: the gradient was not finite), and the
    backward it came from (``torch._C._current_graph_task_id()``)."""

    state: Optional[dict]
    rots: Optional[tuple]
    task: int

    @property
    def finite(self) -> bool:
        return self.state is not None


class _LoQTFn(torch.autograd.Function):
    """``y = x·deq(Q)ᵀ + s·x·ΔWᵀ + b`` with ``ΔW`` = ``B·Pᵀ`` (RIGHT) or ``P·B`` (LEFT).

    A function of tensors only (``q``: the buffers of ``Q`` and ``P``), so
    ``torch.compile`` traces it whole. Saves ``x`` and tensors the layer holds anyway;
    backward dequantizes ``Q`` and ``P`` again for ``∂L/∂x`` and returns ``∂L/∂B`` in low
    rank (:func:`_grad_b`, which also captures the basis for a merge).
    """

    @staticmethod
    def forward(ctx, x, b, bias, spec: _Spec, *q):
        ctx.spec, ctx.has_bias = spec, bias is not None
        ctx.save_for_backward(x, b, *q)
        return _LoQTFn.compute(x, b, bias, spec, q)

    @staticmethod
    def compute(x, b, bias, spec: _Spec, q: tuple) -> Tensor:
        """The forward's value (without autograd: evaluation under ``torch.no_grad``,
        which ``torch.compile`` cannot trace through ``forward``'s ``ctx``)."""
        # s·B, not add(..., alpha=s): inductor fuses add(y, mm(a, b), alpha=s) into an addmm
        # that drops alpha (pytorch/pytorch#167313); the compiled model computed deq(Q)·x
        # + ΔW, off by (1 - s)·ΔW from the first merge on
        p, sb = spec.projection(q, x.dtype), b.to(x.dtype) * spec.scale
        low = (x @ p) @ sb.T if spec.side == RIGHT else (x @ sb.T) @ p.T
        return nn.functional.linear(x, spec.base_weight(q, x.dtype), bias) + low

    @staticmethod
    def backward(ctx, grad_out):
        x, b, *q = ctx.saved_tensors
        spec, dtype = ctx.spec, grad_out.dtype
        q = tuple(q)
        p = spec.projection(q, dtype)
        grad_x = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            sb = b.to(dtype) * spec.scale  # as in forward
            low = (grad_out @ sb) @ p.T if spec.side == RIGHT else (grad_out @ p) @ sb
            grad_x = grad_out @ spec.base_weight(q, dtype) + low
        d2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_b = torch.ops.lowrank_optim.loqt_grad_b(d2, x2, p, spec.key).to(b.dtype)
        if ctx.has_bias:
            grad_bias = d2.sum(0)
        return (grad_x, grad_b, grad_bias, None) + (None,) * len(q)


class LoQTLinear(Float32Tensors):
    r"""A Linear layer trained as LoQT: :math:`W = \mathrm{deq}(Q) + s\,\Delta W`, only
    :math:`B` trainable.

    For a weight :math:`W \in \mathbb{R}^{m\times n}` (``out × in``) the shared side rule
    (:func:`~lowrank_optim.projector.choose_side`, ``"std"``) puts the frozen basis on the
    smaller side: :math:`m \ge n`: :math:`\Delta W = B P^\top`, :math:`P \in
    \mathbb{R}^{n\times r}`, :math:`B \in \mathbb{R}^{m\times r}`; :math:`m < n`:
    :math:`\Delta W = P B`, :math:`P \in \mathbb{R}^{m\times r}`, :math:`B \in
    \mathbb{R}^{r\times n}`. Then :math:`\partial L/\partial B = s\,G P` or
    :math:`s\,P^\top G` with :math:`G = \partial L/\partial W`: GaLore's projected gradient,
    so :math:`B` has GaLore's low-rank state shape.

    Storage, all in ``state_dict()``: ``Q`` as buffers ``weight_codes``/``weight_scale``
    (/``weight_offset``): NF4 through bitsandbytes in absmax blocks of ``group_size``
    (``quant_type="nf4"``, 4 bits only; ``double_quant=True`` stores the absmax as 8-bit
    codes, ``weight_scale_codes``/``_scale``/``_offset``, QLoRA's double quantization) or
    asymmetric min-max integer codes from :mod:`lowrank_optim.quant` (``quant_type="int"``,
    4 bits packed two per byte, or 8);
    with ``bits=None`` a float buffer ``weight`` (LoQT-nq). ``P`` as the shared
    :class:`~lowrank_optim.projector.Projector` stores it: ``proj_bits``-bit codes in groups
    of ``proj_group_size`` (``proj_codes``/``proj_scale``/``proj_offset``) or a float32
    ``proj``. ``B`` is the only parameter besides the bias; ``merges`` counts the merges.

    Defaults: NF4 ``Q`` in blocks of 32 with a double-quantized absmax (4.26 bits per
    weight; ``group_size=None`` and ``double_quant=None`` mean that for NF4, and blocks of
    64 without double quantization for ``quant_type="int"``) and an INT8 ``P``. The
    reference stores ``Q`` and ``P`` as NF4 in blocks of 64 (4.13 bits with its always-on
    double quantization). Chosen by measurement, with the memory it costs:
    ``docs/decisions.md`` (LoQT, storage defaults).

    Forward is ``y = x·deq(Q)ᵀ + s·(x·P)·Bᵀ`` (or ``s·(x·Bᵀ)·Pᵀ``): no dense weight is
    trained and no dense weight gradient exists, except that when
    :class:`~lowrank_optim.LoQTAdamW` arms the layer before a merge, its backward forms
    this layer's :math:`G` once (averaged over ranks under ``torch.distributed``), takes the
    new top-``rank`` basis from its SVD (quantized as above), returns ``∂L/∂B`` in the new
    basis and frees :math:`G` before the next layer's backward runs. Further micro-batches
    of the same step reuse that basis. :meth:`merge_` then folds :math:`B` into :math:`Q`.

    Until its first merge ``P`` is zero, so the layer computes ``deq(Q)·x``.

    ``torch.compile`` (inductor, ``fullgraph=True`` included) traces forward and backward
    whole, for every storage: the autograd function takes only tensors (NF4 is
    dequantized by plain torch ops, :func:`~lowrank_optim.quant.nf4_dequantize`), and the
    capture for a merge runs inside the custom op ``lowrank_optim::loqt_grad_b`` that
    returns :math:`\partial L/\partial B`, so arming a layer changes no guard and a merge
    recompiles nothing. In a compiled backward the armed layers' dense gradients are
    formed one op at a time as in eager; the capture costs one host synchronization
    (its finiteness check), at armed steps only.
    """

    FLOAT32 = ("weight_scale", "weight_offset", "weight_scale_scale",
                     "weight_scale_offset", "proj", "proj_scale", "proj_offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rank: int = 128, scale: float = 0.5, bits: Optional[int] = 4,
                 quant_type: Optional[str] = None, group_size: Optional[int] = None,
                 proj_bits: Optional[int] = 8, proj_group_size: int = 64, svd: str = "exact",
                 double_quant: Optional[bool] = None, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"Invalid scale: {scale!r} (expected scale > 0)")
        quant_type = quant_type or ("nf4" if bits == 4 else "int")
        if quant_type not in ("nf4", "int"):
            raise ValueError(f"Invalid quant_type: {quant_type!r} (expected 'nf4' or 'int')")
        nf4 = bits is not None and quant_type == "nf4"
        group_size = (32 if nf4 else 64) if group_size is None else group_size
        double_quant = nf4 if double_quant is None else double_quant
        if bits is not None:
            if quant_type == "nf4" and bits != 4:
                raise ValueError(f"Invalid bits: {bits!r} (quant_type='nf4' has 4 bits; use "
                                 "quant_type='int' for 2 to 8 bits, or bits=None)")
            quant._check(bits, group_size, "nf4" if quant_type == "nf4" else "asym")
        if double_quant and (bits is None or quant_type != "nf4"):
            raise ValueError(f"Invalid double_quant: {double_quant!r} (it quantizes NF4's "
                             "absmax: needs bits=4 with quant_type='nf4')")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.quant_type, self.group_size = bits, quant_type, group_size
        self.double_quant = bool(double_quant)
        self.scale = float(scale)
        self.projector = Projector(rank, "std", svd, proj_bits, proj_group_size)
        m, n = out_features, in_features
        self.side = choose_side((m, n), "std")
        self.rank = r = min(rank, m, n)
        kw = dict(device=device)
        if bits is None:
            self.register_buffer("weight", torch.zeros(m, n, dtype=dtype, **kw))
        else:
            self._register_codes("weight", m * n, bits, group_size, quant_type == "int", kw)
            if self.double_quant:  # the absmax as 8-bit codes, zero: an all-zero weight
                groups = self._buffers.pop("weight_scale").numel()
                self._register_codes("weight_scale", groups, 8, quant.DQ_GROUP, True, kw)
                self.weight_scale_scale.fill_(1.0)
        numel = min(m, n) * r
        if proj_bits is None:
            self.register_buffer("proj", torch.zeros(min(m, n), r, **kw))
        else:
            self._register_codes("proj", numel, proj_bits, proj_group_size, True, kw)
        self.register_buffer("merges", torch.zeros((), dtype=torch.int64, **kw))
        self.B = nn.Parameter(torch.zeros((m, r) if self.side == RIGHT else (r, n), dtype=dtype,
                                          **kw))
        self.bias = nn.Parameter(torch.zeros(m, dtype=dtype, **kw)) if bias else None
        # armed (±1, the sign of the objective: -1 for a maximizing optimizer) by LoQTAdamW
        # for the backward before a merge; 0 otherwise
        self.capture = 0
        self._pending: Optional[_Pending] = None  # what the armed backward captured
        self._qnames = tuple(k for k in self._buffers if k.startswith(("weight", "proj")))
        self._register()

    def _register(self) -> None:
        """A key of its own (``_layers.register_layer``: the backward's custom op looks the
        layer up there), and the link from ``B`` to this layer (how the optimizer finds it)."""
        self._key = register_layer(self)
        self.B.loqt_owner = self

    def __setstate__(self, state):
        # deepcopy and unpickling: a copy is a layer of its own (its own key; the copied
        # B, which does not carry Parameter attributes along, is linked to it)
        super().__setstate__(state)
        self._register()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.B.loqt_owner = self  # a new B under set_overwrite_module_params_on_conversion
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.B.loqt_owner = self  # a new B with load_state_dict(..., assign=True)

    def _register_codes(self, name, numel, bits, group_size, offset, kw) -> None:
        # zero codes, scale 1, offset 0: dequantizes to exactly zero
        self.register_buffer(f"{name}_codes", torch.zeros(
            (numel + 1) // 2 if bits <= 4 else numel, dtype=torch.uint8, **kw))
        groups = -(-numel // group_size)
        self.register_buffer(f"{name}_scale", torch.ones(groups, **kw))
        if offset:
            self.register_buffer(f"{name}_offset", torch.zeros(groups, **kw))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "LoQTLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=w.device, dtype=w.dtype, **kwargs)
        if w.device.type != "meta":
            layer._store_base(w.float())
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach())
        return layer

    # ---- storage ------------------------------------------------------------------------
    def _quantize(self, w: Tensor) -> Tensor | quant.QTensor:
        if self.bits is None:
            return w
        if self.quant_type == "nf4":
            return quant.nf4_quantize(w, self.group_size, self.double_quant)
        return quant.quantize(w, self.bits, self.group_size)

    def _dequantize(self, q, dtype=torch.float32) -> Tensor:
        return q.to(dtype) if isinstance(q, Tensor) else q.dequantize(dtype)

    def _store_base(self, w: Tensor) -> None:
        self._write_base(self._quantize(w))

    def _write_base(self, q) -> None:
        """Copy a quantized (or, unquantized, float) weight into this layer's buffers."""
        if isinstance(q, Tensor):
            self.weight.copy_(q)
        else:
            flat = {}
            quant.put(flat, "weight", q)
            for key, t in flat.items():
                self._buffers[key].copy_(t)

    def base_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``deq(Q)``, ``out × in``, in ``dtype``."""
        return self._spec.base_weight(self._q(), dtype)

    def _q(self) -> tuple:
        return tuple(getattr(self, k) for k in self._qnames)

    def _proj_state(self, with_side: bool = True) -> dict:
        st = {k: v for k, v in self._buffers.items() if k.startswith("proj")}
        if with_side:
            st["proj_side"] = self.side
        return st

    def projection(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``deq(P)``, ``min(m, n) × rank`` (zero before the first merge)."""
        return self._spec.projection(self._q(), dtype)

    @property
    def _spec(self) -> _Spec:
        proj = self.projector
        return _Spec(self.out_features, self.in_features, self.side, self.scale, self.bits,
                     self.group_size, "nf4" if self.quant_type == "nf4" else "asym",
                     self.rank, proj.quant_bits, proj.quant_group_size, self._qnames,
                     self._key)

    def _basis(self, st: dict) -> Tensor:
        """The one-sided float32 basis stored in projector state ``st``."""
        like = torch.empty(self.out_features, self.in_features, device="meta")
        left, right = self.projector.bases(st, like)
        return left if right is None else right

    def _delta(self, p: Tensor, b: Tensor) -> Tensor:
        return b @ p.T if self.side == RIGHT else p @ b

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight this layer computes with, ``deq(Q) + s·ΔW``."""
        delta = self._delta(self.projection(), self.B.detach().float())
        # out of place: an unquantized layer's base_weight() is its buffer itself
        return torch.add(self.base_weight(torch.float32), delta, alpha=self.scale).to(dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """The plain ``nn.Linear`` this layer computes, ``deq(Q) + s·ΔW`` merged, in
        ``dtype`` (default: ``B``'s)."""
        return plain_linear(self, self.effective_weight(), self.bias, dtype or self.B.dtype)

    # ---- merges -------------------------------------------------------------------------
    def _capture(self, d2: Tensor, x2: Tensor) -> Optional[Tensor]:
        """At an armed backward: the new basis (float32), computed from this backward's
        dense gradient ``d2ᵀ·x2``, which is freed on return; ``None`` when not armed or
        when that gradient is not finite.

        What is captured belongs to the current step's gradient: it is reused by later
        backward passes of the same step (gradient accumulation: ``B.grad`` already holds
        a part; a layer used twice: the same backward) and dropped otherwise, so a step
        the optimizer skipped (GradScaler on an overflow: no ``step``, then ``zero_grad``)
        leaves nothing behind for the next. A non-finite gradient (a GradScaler overflow)
        does not raise here: it is recorded as such, ``∂L/∂B`` comes out non-finite too
        (the basis is kept), and no merge takes it (:class:`LoQTAdamW` waits for the next
        backward). The basis of a gradient scaled by a GradScaler is that of the unscaled
        one: singular vectors do not depend on a positive factor (a power of two scales
        every floating-point step of the SVD exactly)."""
        if not self.capture:
            return None
        task, pend = torch._C._current_graph_task_id(), self._pending
        if pend is None or not pend.finite or (pend.task != task and self.B.grad is None):
            g = distributed.all_reduce_mean_(d2.T.float() @ x2.float())
            if self.capture < 0:  # a maximizing optimizer: the basis of the descent direction
                g.neg_()
            if bool(torch.isfinite(g).all()):  # one host sync, at an armed backward only
                st = self._proj_state(with_side=bool(self.merges))
                rots = self.projector.refresh(st, g, seed=int(self.merges))
                st["proj_side"] = self.side
                pend = _Pending(st, rots, task)
            else:
                pend = _Pending(None, None, task)
            del g
            self._pending = pend
        return self._basis(pend.state) if pend.finite else None

    @property
    def merge_ready(self) -> bool:
        """True once an armed backward has captured a finite basis for the next merge."""
        return self._pending is not None and self._pending.finite

    @torch.no_grad()
    def merge_(self, ec_iters: int = 5) -> Optional[tuple]:
        r"""Fold :math:`B` into :math:`Q` and install the captured basis.

        :math:`W = \mathrm{deq}(Q) + s\,\Delta W(P_{old}, B)` (the effective weight), then
        :math:`P \leftarrow P_{new}` and error compensation: with :math:`Q_0 = Q(W)`, for
        :math:`c = 1..C`: :math:`R_c = W - \mathrm{deq}(Q_c)`, :math:`B_c = P^{+}R_c/s`
        (or :math:`R_c P^{+\top}/s`), :math:`Q_{c+1} = Q(W - s\,\Delta W(P, B_c))`; the pair
        with the smallest :math:`\|R_c - s\,\Delta W(P, B_c)\|_F` is kept. ``ec_iters=0``,
        or an unquantized layer, gives :math:`Q = Q(W)`, :math:`B = 0`. Returns the
        rotations :math:`P_{old}^\top P_{new}` (``None`` at the first merge or when the
        basis was kept); raises ``RuntimeError`` when no basis was captured."""
        if not self.merge_ready:
            raise RuntimeError("LoQTLinear.merge_: no basis captured" + (
                "" if self._pending is None else " (the armed backward's gradient was not "
                "finite)") + "; arm the layer (layer.capture = 1) and run a backward pass "
                "first")
        st, rots, _ = self._pending
        w = self.effective_weight()
        for k, v in st.items():
            if k != "proj_side":
                self._buffers[k].copy_(v)
        p = self.projection()
        q, b = self._quantize(w), torch.zeros_like(self.B, dtype=torch.float32)
        if self.bits is not None and ec_iters > 0:
            pinv = torch.linalg.pinv(p)
            best, qc = None, q  # round 1 quantizes w itself: q
            for c in range(ec_iters):
                resid = w - self._dequantize(qc)
                bc = (resid @ pinv.T if self.side == RIGHT else pinv @ resid) / self.scale
                low = self._delta(p, bc).mul_(self.scale)
                err = float(torch.linalg.matrix_norm(resid.sub_(low)))
                if best is None or err < best[0]:
                    best = (err, qc, bc)
                if c + 1 < ec_iters:
                    qc = self._quantize(w - low)
            _, q, b = best
        self._write_base(q)
        self.B.copy_(b)
        self.merges += 1
        self._pending, self.capture = None, 0
        return rots

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return _LoQTFn.compute(x, self.B, self.bias, self._spec, self._q())
        return _LoQTFn.apply(x, self.B, self.bias, self._spec, *self._q())

    def extra_repr(self) -> str:
        q = "none" if self.bits is None else "nf4" if self.quant_type == "nf4" else f"int{self.bits}"
        if self.bits is not None:
            q += f"/{self.group_size}" + ("+dq" if self.double_quant else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, scale={self.scale}, "
                f"quant={q}, proj_bits={self.projector.quant_bits}")


def prepare_loqt(model: nn.Module, rank: int = 128, bits: Optional[int] = 4,
                 target_modules: Optional[Iterable[str]] = ("attn", "mlp"),
                 scale: float = 0.5, **kwargs) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by a :class:`LoQTLinear` whose ``Q``
    is the quantized weight; returns ``model``. ``kwargs`` go to :class:`LoQTLinear`
    (``quant_type``, ``group_size``, ``double_quant``, ``proj_bits``, ``proj_group_size``,
    ``svd``).
    Other parameters (embeddings, norms, head) are untouched and stay trainable."""
    return swap_linears(model, target_modules, lambda linear: LoQTLinear.from_linear(
        linear, rank=rank, scale=scale, bits=bits, **kwargs))
