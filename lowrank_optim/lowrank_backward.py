r"""GaLore with a low-rank backward: the projected gradient without the dense one.

Normal GaLore pays for the dense gradient :math:`G = \partial L/\partial W =
dY^\top X` (:math:`2bmn` FLOPs for :math:`b` tokens, :math:`m \times n` floats held until
the step) and then projects it. The projected gradient can be formed from what backward
already has, the layer's input :math:`X` (:math:`b \times n`) and output gradient
:math:`dY` (:math:`b \times m`):

=========  ===========================  ==========================================
side       projected gradient            computed as (FLOPs)
=========  ===========================  ==========================================
``RIGHT``  :math:`G Q` (m×r)            :math:`dY^\top (X Q)` (:math:`2br(m+n)`)
``LEFT``   :math:`P^\top G` (r×n)       :math:`(dY P)^\top X` (:math:`2br(m+n)`)
``BOTH``   :math:`P^\top G Q` (r×r)     :math:`(dY P)^\top (X Q)`
=========  ===========================  ==========================================

``lo.prepare_galore(model, rank=128)`` swaps the target ``nn.Linear`` layers for
:class:`GaLoreLinear` *before* DDP and the optimizer are made; then any GaLore-family
optimizer (:class:`~lowrank_optim.GaLoreAdamW`, ``GaLoreAdamW8bit``, ``GaLoreAdafactor``,
``QGaLoreAdamW8bit``) over ``model.parameters()`` trains it. A layer keeps its
``weight`` (and ``bias``) as they were, but the weight is frozen (``requires_grad=False``:
it never has a ``.grad``), and a new parameter ``weight_lowrank`` of the low-rank shape
(``m×r``, ``r×n`` or ``r×r``) receives the projected gradient as its ordinary ``.grad``:
``clip_grad_norm_``, ``GradScaler``, DDP buckets and the per-layer hooks
(``opt.register_hooks``) treat it as any gradient. Its values are zeros and are never
read (every layer's is a view of one shared zero buffer, so together they take the memory
of the largest); it is left out of the model's ``state_dict`` (whose keys stay those of the plain
model). The optimizer skips ``project`` for it (the gradient is already projected) and
writes the update into the layer's weight (``LowRankOptimizer._matrix``); its state (basis,
moments, counters) is normal GaLore's for that weight, so ``state_dict`` round trips
(``weights_only=True``) and the load checks work unchanged.

Activations: on a step without refresh the eager forward of a layer with a right basis saves
:math:`XQ` (``r`` floats per token) for its backward instead of :math:`X` (``n``); a left
basis needs :math:`X` itself. Weights' gradients: none; low-rank gradients: :math:`r`
per row or column, as GaLore's state.

**torch.compile** (inductor, ``fullgraph=True`` too) traces forward and backward whole:
the low-rank gradient, and at a refresh the dense gradient, its SVD and the optimizer's
state update, run inside the custom op ``lowrank_optim::galore_grad_lowrank``, opaque to
the compiler, so a refresh changes no guard and recompiles nothing; the compiled forward
reads no optimizer state and saves ``X`` rather than ``X·Q``; under ``torch.no_grad`` the
layer is a plain linear (``tests/test_lowrank_backward.py``: equal to eager across
refreshes, both sides, one graph).

**Refresh.** At a refresh step of a layer (the optimizer's policy for its
``weight_lowrank``: ``update_proj_gap``, ``stagger``, Q-GaLore's lazy refresh) its backward
forms that layer's dense gradient once, in float32, takes the new basis from it with the
optimizer's own refresh (``state_on_refresh`` applies to the moments there), returns
the projected gradient in the new basis and frees the dense gradient before the next
layer's backward runs: at most one layer's dense gradient exists at a time (LoQT's
pattern). Chosen by measurement over a sketch built from activations
(:math:`G\Omega = dY^\top(X\Omega)`, :math:`G^\top Y = X^\top(dY\,Y)`), which would serve
only ``svd="randomized"``, needs one all-reduce per pass under DDP, and on the LLaMA-60M
shapes costs as much as the dense gradient (``benchmarks/bench_lowrank_backward.py
--refresh-cost``, 512 tokens, rank 128, one thread: all 56 matrices 1.08 s with the dense
gradient and the randomized SVD, 1.16 s with the sketch; 4.5 s with the exact SVD, 23 ms
per step at a gap of 200): the dense path gives the exact SVD and every ``svd`` option, the same
basis as normal GaLore, and one all-reduce per refresh.

**DDP.** Only the low-rank gradients (and those of the parameters that are not swapped)
are in DDP's buckets: per step :math:`r\max(m,n)` floats per projected matrix
(``"std"``) instead of :math:`mn`. Every rank uses the same basis because the refresh all-reduces
(averages) the dense gradient over the default process group before the SVD, exactly
the average DDP would have formed, and randomized sketches are seeded by the refresh
count; the low-rank gradients are then projections of the same average and the moments,
bases and weights stay bit-identical across replicas.

Differences from normal GaLore, all by construction:

* with gradient accumulation the basis of a refresh step comes from its first
  micro-batch (the dense gradient is never summed over micro-batches); every
  micro-batch's low-rank gradient uses that basis;
* gradient clipping sees the projected gradient's norm (at most the dense one's);
* a refresh whose dense gradient is not finite keeps the previous basis (as normal
  GaLore); at the first refresh there is none, and the low-rank gradient is NaN so
  that ``GradScaler`` skips the step and the refresh is retried in the next backward
  (without a scaler ``step`` raises).

What cannot work raises: a layer whose ``weight_lowrank`` is in no GaLore-family
optimizer (``torch.optim.AdamW`` would train the unused zeros and never the weight)
raises in backward; a param group without ``rank``, with another effective rank or a
``proj_type`` that picks another side than the layer's, or an optimizer that needs the
full gradient, raises when the optimizer is made. The layer serves the last optimizer
made over it.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from . import distributed
from ._layers import layer_by_key, plain_linear, register_layer, swap_linears
from .projector import BOTH, LEFT, PROJ_TYPES, RIGHT, choose_side

__all__ = ["GaLoreLinear", "prepare_galore", "bind"]

_ZEROS: dict = {}  # (device, dtype) -> the shared zeros the weight_lowrank values view


def _zeros(shape, device, dtype) -> Tensor:
    """A ``shape`` view of one zero buffer shared by every layer of that device and dtype:
    ``weight_lowrank``'s values are never read, so the proxies of all layers together
    take the memory of the largest one (a dense, non-overlapping view, so DDP's initial
    broadcast can write its zeros into it)."""
    numel, key = math.prod(shape), (torch.device(device), dtype)
    buf = _ZEROS.get(key)
    if buf is None or buf.numel() < numel or buf.is_inference():
        with torch.inference_mode(False), torch.no_grad():
            buf = _ZEROS[key] = torch.zeros(numel, device=device, dtype=dtype)
    return buf[:numel].view(shape)


@torch.library.custom_op("lowrank_optim::galore_grad_lowrank", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _grad_lowrank(d2: Tensor, x2: Tensor, lowrank: Tensor, key: int, projected: bool) -> Tensor:
    """The gradient of layer ``key``'s ``weight_lowrank`` (``lowrank``: passed for its shape
    and dtype only) from ``∂L/∂y`` and ``x`` (or ``x·Q`` when ``projected``), flattened to
    2-D: :meth:`GaLoreLinear._projected_grad`, contiguous.

    A custom op, so that ``torch.compile`` keeps this call opaque inside the compiled
    backward: the optimizer's Python state it reads (refresh due or not, the basis) and
    the refresh it may run (the dense gradient, its finiteness check, the SVD, the
    optimizer's state update) stay out of the graph, with no graph break and no guard on
    them (no recompilation at refreshes). It runs Python at every call, so it is tagged
    unsafe for CUDA graphs (as LoQT's ``loqt_grad_b``). Its fake depends on its inputs
    only (``lowrank``'s shape and dtype), never on the layer's state: compiled graphs and
    inductor's caches stay valid for any layer of that shape."""
    return layer_by_key(key)._projected_grad(d2, x2, projected).contiguous()


@_grad_lowrank.register_fake
def _(d2, x2, lowrank, key, projected):
    return torch.empty_like(lowrank, memory_format=torch.contiguous_format)


class _LowRankGradFn(torch.autograd.Function):
    """``y = x·Wᵀ + b``; backward returns ``∂L/∂x``, ``∂L/∂b`` and, for ``weight_lowrank``,
    the projected weight gradient (:func:`_grad_lowrank`); none for ``W``. Given the right
    basis ``Q`` (a step without refresh, eager only), it saves ``x·Q`` instead of ``x``."""

    @staticmethod
    def forward(ctx, x, weight, lowrank, bias, key, right):
        ctx.key, ctx.has_bias, ctx.projected = key, bias is not None, right is not None
        saved = x if right is None else x @ right.to(x.dtype)
        # weight: autograd checks it is unchanged; lowrank: a view of the shared zeros
        ctx.save_for_backward(saved, weight, lowrank)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lowrank = ctx.saved_tensors
        grad_x = grad_low = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        d2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_low = torch.ops.lowrank_optim.galore_grad_lowrank(d2, x2, lowrank, ctx.key,
                                                                    ctx.projected)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = d2.sum(0)
        return grad_x, None, grad_low, grad_bias, None, None


class GaLoreLinear(nn.Linear):
    r"""An ``nn.Linear`` whose weight trains by GaLore with a low-rank backward.

    For ``weight`` :math:`W \in \mathbb{R}^{m\times n}` (``out × in``) the side comes from
    ``proj_type`` as in :func:`~lowrank_optim.projector.choose_side`, and
    ``weight_lowrank`` has the shape of GaLore's projected gradient for it: ``m×r``
    (right basis), ``r×n`` (left) or ``r×r`` (``"full"``), :math:`r = \min(\text{rank},
    m, n)`. See :mod:`lowrank_optim.lowrank_backward`. Made by :func:`prepare_galore`
    (or :meth:`from_linear`, which shares the Linear's own ``weight`` and ``bias``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rank: int = 128, proj_type: str = "std", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(rank, proj_type)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 128,
                    proj_type: str = "std") -> "GaLoreLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias  # the same Parameters
        layer._setup(rank, proj_type)
        return layer

    def _setup(self, rank: int, proj_type: str) -> None:
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
            raise ValueError(f"Invalid rank: {rank!r} (expected a positive int)")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"Invalid proj_type: {proj_type!r} (expected one of {PROJ_TYPES})")
        m, n = self.out_features, self.in_features
        self.proj_type, self.side, self.rank = proj_type, choose_side((m, n), proj_type), min(rank, m, n)
        r = self.rank
        shape = {RIGHT: (m, r), LEFT: (r, n), BOTH: (r, r)}[self.side]
        self.weight.requires_grad_(False)
        w = self.weight
        self.weight_lowrank = nn.Parameter(_zeros(shape, w.device, w.dtype))
        self._optimizer = None  # weakref to the optimizer that serves this layer (bind)
        self._register()
        self._link()

    def _register(self) -> None:
        """A key of its own (``_layers.register_layer``: the backward's custom op looks the
        layer up there); a copy (deepcopy, unpickling) gets its own."""
        self._key = register_layer(self)

    def _link(self) -> None:
        # the parameter names its layer (the optimizer finds the weight through it);
        # re-linked after copies: a deep-copied Parameter loses its attributes
        low = self.weight_lowrank
        low.lowrank_layer = self
        if low.untyped_storage().data_ptr() != _zeros(low.shape, low.device, low.dtype) \
                .untyped_storage().data_ptr():
            low.data = _zeros(low.shape, low.device, low.dtype)  # copies get their own

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register()
        self._link()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._link()  # .to(dtype or device) converts each parameter on its own
        return self

    # ---- the optimizer ------------------------------------------------------------------
    def _bind(self, optimizer, group: dict) -> None:
        """Called by the optimizer's ``add_param_group``: check ``group`` and serve it."""
        name = type(optimizer).__name__
        where = (f"{name} cannot train this GaLoreLinear (out={self.out_features}, "
                 f"in={self.in_features}, rank={self.rank}, side="
                 f"{('left', 'right', 'both')[self.side]})")
        rank = group.get("rank")
        if rank is None:
            raise ValueError(f"{where}: its weight_lowrank is in a param group without rank; "
                             "it belongs in a projected group (rank=..., as "
                             "lo.param_groups(model) makes) of a GaLore-family optimizer")
        if isinstance(self.weight_lowrank, distributed._dtensor_class()):
            raise NotImplementedError(f"{where}: its weight_lowrank is FSDP2-sharded; a low-rank "
                                      "backward supports DistributedDataParallel, not FSDP2")
        if getattr(optimizer, "needs_full_grad", False):
            raise ValueError(f"{where}: {name} needs the full gradient, which a low-rank "
                             "backward never forms; use normal nn.Linear layers")
        m, n = self.out_features, self.in_features
        if min(rank, m, n) != self.rank:
            raise ValueError(f"{where}: the group's rank {rank!r} gives {min(rank, m, n)} for "
                             f"this {m}x{n} weight, the layer's weight_lowrank has rank "
                             f"{self.rank}; pass the same rank to prepare_galore and the "
                             "optimizer")
        side = choose_side((m, n), group["proj_type"])
        if side != self.side:
            raise ValueError(f"{where}: the group's proj_type {group['proj_type']!r} puts the "
                             f"basis on the {('left', 'right', 'both')[side]} side; pass "
                             "the same proj_type to prepare_galore and the optimizer")
        self._optimizer = weakref.ref(optimizer)

    def _owner(self):
        """(optimizer, group, state) of ``weight_lowrank``; raises when none serves it."""
        opt = None if self._optimizer is None else self._optimizer()
        low = self.weight_lowrank
        group = None if opt is None else next(
            (g for g in opt.param_groups if any(q is low for q in g["params"])), None)
        if group is None:
            raise RuntimeError(
                f"GaLoreLinear (out={self.out_features}, in={self.in_features}): its "
                "weight_lowrank is in no GaLore-family optimizer (GaLoreAdamW, "
                "GaLoreAdamW8bit, GaLoreAdafactor, QGaLoreAdamW8bit), and only such an "
                "optimizer writes its projected gradient into the weight (another one would "
                "train the unused zeros). Make one over model.parameters() before the "
                "backward pass, or use lo.to_plain(model) with any other optimizer")
        return opt, group, opt.state[low]

    def missed_refresh(self, step: int) -> RuntimeError:
        """The error of ``step_param`` when this layer's refresh is due at the step but
        backward did not do it."""
        return RuntimeError(
            f"GaLoreLinear (out={self.out_features}, in={self.in_features}): the basis "
            f"refresh due at step {step} happens in backward, and none happened: the dense "
            "gradient was not finite at the first refresh (there is no basis to fall back "
            "on; with a GradScaler the step is skipped and the refresh retried), or the "
            "gradient was produced before this optimizer was made or loaded")

    # ---- backward -----------------------------------------------------------------------
    def _saved_basis(self) -> Optional[Tensor]:
        """The right basis ``Q`` when the next backward needs only ``X·Q`` (saved by forward
        instead of ``X``: ``r`` instead of ``n`` floats per token); ``None`` at a refresh (the
        dense gradient needs ``X``), for a left basis, or with no optimizer yet."""
        if self.side == LEFT or self._optimizer is None or self._optimizer() is None:
            return None
        opt, group, state = self._owner()
        policy = opt._refresh_policy(self.weight_lowrank, group)
        if policy.due(state, state.get("step", 0)):
            return None
        return opt._projector(group).bases(state, self.weight)[1]

    def _projected_grad(self, d2: Tensor, x2: Tensor, projected: bool = False) -> Tensor:
        """The gradient of ``weight_lowrank`` from ``d2`` (tokens × out) and ``x2`` (tokens ×
        in, or ``X·Q`` when ``projected``); at a refresh step, through this layer's dense
        gradient (see the module)."""
        opt, group, state = self._owner()
        low, dtype = self.weight_lowrank, self.weight_lowrank.dtype
        proj, policy = opt._projector(group), opt._refresh_policy(low, group)
        state.setdefault("step", 0)
        if policy.due(state, state["step"]):
            if projected:
                raise RuntimeError(
                    f"GaLoreLinear (out={self.out_features}, in={self.in_features}): a basis "
                    "refresh came due between its forward and backward (the optimizer stepped "
                    "or loaded a state dict in between); run the forward again")
            with torch.no_grad():
                g = distributed.all_reduce_mean_(d2.T.float() @ x2.float())
                finite = bool(torch.isfinite(g).all())
                if finite or proj.has_basis(state):
                    sign = -1.0 if group.get("maximize") else 1.0
                    opt._refresh(low, g.mul_(sign), group, state, proj, policy)
                    return proj.project(state, g).mul_(sign).to(dtype)
                return torch.full_like(low, float("nan"))
        left, right = proj.bases(state, self.weight)
        d = d2 if left is None else d2 @ left.to(d2.dtype)  # dY·P
        x = x2 if right is None or projected else x2 @ right.to(x2.dtype)  # X·Q
        return (d.T @ x.to(d.dtype)).to(dtype)  # (autocast: dY may be bf16, X float32)

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.weight_lowrank.requires_grad):
            return nn.functional.linear(x, self.weight, self.bias)
        # under torch.compile the forward reads no optimizer state (it would be guarded on
        # and recompile at every refresh): it saves X, and backward projects it
        right = None if torch.compiler.is_compiling() else self._saved_basis()
        return _LowRankGradFn.apply(x, self.weight, self.weight_lowrank, self.bias, self._key,
                                    right)

    # ---- storage ------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_lowrank", None)  # zeros, never read

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight_lowrank" in missing_keys:
            missing_keys.remove(prefix + "weight_lowrank")

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with copies of this layer's weight and bias."""
        return plain_linear(self, self.weight.detach(), self.bias, dtype or self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, proj_type={self.proj_type!r}"


def prepare_galore(model: nn.Module, rank: int = 128, proj_type: str = "std",
                   target_modules: Optional[Iterable[str]] = ("attn", "mlp")) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by a :class:`GaLoreLinear` sharing its
    weight and bias; returns ``model``. Call it before wrapping the model in DDP and before
    making the optimizer, with the optimizer's ``rank`` and ``proj_type``. ``to_plain``
    reverses it."""
    swap_linears(model, target_modules,
                 lambda linear: GaLoreLinear.from_linear(linear, rank, proj_type))
    for m in model.modules():
        if isinstance(m, GaLoreLinear):
            m._link()  # every proxy onto the final (largest) shared buffer
    return model


def bind(optimizer, group: dict) -> None:
    """Let the :class:`GaLoreLinear` layers whose ``weight_lowrank`` is in ``group`` serve
    ``optimizer`` (called by ``LowRankOptimizer.add_param_group``); raises ``ValueError``
    when the group cannot train them."""
    for p in group["params"]:
        layer = getattr(p, "lowrank_layer", None)
        if layer is not None and layer.weight_lowrank is p:
            layer._bind(optimizer, group)
