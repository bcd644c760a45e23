r"""Inner update rules as objects: what runs on the (low-rank or full) gradient.

A rule owns everything about its optimizer state and nothing about projection, learning
rate or weight decay (the base optimizer applies those in full space; optax's
``scale_by_galore(base_optimizer)`` idea). A rule is stateless; its hyperparameters are
read from the param group, so per-group values work. The interface:

* ``validate(group)``: raise ``ValueError`` naming a bad hyperparameter of the rule;
* ``init(state, like, group)``: create zero state for a gradient shaped like ``like``;
* ``update(state, g, step, group, low_rank) -> d``: update the state with ``g`` (step
  ``step`` >= 1) and return the float32 direction ``d`` (the update is :math:`-\eta d`);
  ``low_rank`` says whether ``g`` is a projected gradient (Adam then uses the GaLore
  reference's ε placement);
* ``shapes(shape, group) -> {key: shape}``: the state tensors' shapes for a gradient of
  ``shape`` (checked by ``load_state_dict``);
* ``transport_(state, move)``: the moments after a basis change; ``move(value, squared)``
  rotates a float32 moment into the new basis (``squared=True`` for a second moment,
  which must stay non-negative). Used by ``state_on_refresh="project"``.

:class:`TorchRule` runs any ``torch.optim`` / ``torch_optimizer`` class as a rule
(:class:`lowrank_optim.GaLore`).

The math is in :mod:`lowrank_optim.functional`.
"""
from __future__ import annotations

import collections
import inspect
from typing import Callable

import torch
from torch import Tensor

from . import functional as F
from . import fsdp
from ._checks import check, check_int

__all__ = ["Rule", "Adam", "Adam8bit", "Adafactor", "TorchRule", "DENIED"]


class Rule:
    """Base of the inner rules; ``MOMENTS`` names the float moments that follow a basis
    change (the first rotated linearly, the rest with the squared rotation)."""

    MOMENTS: tuple = ()

    def validate(self, group: dict) -> None:
        pass

    def init(self, state: dict, like: Tensor, group: dict) -> None:
        raise NotImplementedError

    def update(self, state: dict, g: Tensor, step: int, group: dict, low_rank: bool) -> Tensor:
        raise NotImplementedError

    def shapes(self, shape: tuple, group: dict) -> dict:
        return {name: shape for name in self.MOMENTS}

    def step_full_(self, state: dict, w: Tensor, g: Tensor, step: int, group: dict) -> bool:
        """The whole update of an unprojected parameter ``w`` (the rule, decoupled weight
        decay and ``lr`` as ``torch.optim.AdamW``) in one fused kernel, when the rule has
        one for these tensors; returns whether it wrote ``w``. The default has none: the
        base then takes :meth:`update`'s direction to ``_put_back_``."""
        return False

    def transport_(self, state: dict, move: Callable[[Tensor, bool], Tensor]) -> None:
        for k, name in enumerate(self.MOMENTS):
            if self.has(state, name):
                self.set(state, name, move(self.get(state, name), k > 0))

    # the moments as float tensors (a quantized rule stores them otherwise)
    def has(self, state: dict, name: str) -> bool:
        return name in state

    def get(self, state: dict, name: str) -> Tensor:
        return state[name]

    def set(self, state: dict, name: str, value: Tensor) -> None:
        state[name] = value.to(state[name].dtype)


class Adam(Rule):
    """Adam with bias correction (``betas``, ``eps``): :func:`functional.adam_`. Moments
    of a plain parameter have its dtype and layout (as ``torch.optim.AdamW``); low-rank
    ones are float32 (they are small)."""

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def validate(self, group):
        betas = group["betas"]
        check(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", betas,
              "a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            check(0.0 <= b < 1.0, f"beta parameter at index {i}", b, f"0 <= beta{i + 1} < 1")

    def init(self, state, like, group):
        for name in self.MOMENTS:
            state[name] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def update(self, state, g, step, group, low_rank):
        b1, b2 = group["betas"]
        return F.adam_(g, state["exp_avg"], state["exp_avg_sq"], step, b1, b2, group["eps"],
                       hf_eps=low_rank)

    def step_full_(self, state, w, g, step, group):
        if "exp_avg" not in state:  # moments stored otherwise (Adam8bit's codes)
            return False
        b1, b2 = group["betas"]
        return F.adamw_fused_(w, g, state["exp_avg"], state["exp_avg_sq"], step, group["lr"],
                              b1, b2, group["eps"], group["weight_decay"])


class Adam8bit(Adam):
    """:class:`Adam` with both moments as 8-bit blockwise codes (``exp_avg_codes``,
    ``exp_avg_absmax``, ...) for tensors of at least ``min_8bit_size`` elements;
    smaller ones keep :class:`Adam`'s float moments, as bitsandbytes does."""

    def validate(self, group):
        super().validate(group)
        check_int("min_8bit_size", group["min_8bit_size"], 0)

    def init(self, state, like, group):
        if fsdp.global_numel(like) >= group["min_8bit_size"]:  # a shard: the whole tensor's
            F.init_adam8bit(state, like)
        else:
            super().init(state, like, group)

    def update(self, state, g, step, group, low_rank):
        if "exp_avg_codes" not in state:
            return super().update(state, g, step, group, low_rank)
        b1, b2 = group["betas"]
        return F.adam8bit_(g, state, step, b1, b2, group["eps"])

    def shapes(self, shape, group):
        return {k: shape for k in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes")}

    def has(self, state, name):
        return name in state or f"{name}_codes" in state

    def get(self, state, name):
        return F.dequantize_adam8bit(state, name) if f"{name}_codes" in state else state[name]

    def set(self, state, name, value):
        if f"{name}_codes" in state:
            F.quantize_adam8bit(state, name, value)
        else:
            super().set(state, name, value)


class Adafactor(Rule):
    """Adafactor (``beta1`` or None, ``eps``, ``clip_threshold``): :func:`functional.adafactor_`,
    a factored second moment for matrices; only the first moment follows a basis change."""

    MOMENTS = ("exp_avg",)

    def validate(self, group):
        beta1, clip = group["beta1"], group["clip_threshold"]
        check(beta1 is None or 0.0 <= beta1 < 1.0, "beta1", beta1, "None or 0 <= beta1 < 1")
        check(clip > 0, "clip_threshold", clip, "> 0")

    def init(self, state, like, group):
        F.init_adafactor(state, like, group["beta1"])

    def update(self, state, g, step, group, low_rank):
        return F.adafactor_(g, state, step, group["beta1"], group["eps"],
                            group["clip_threshold"], shard=fsdp.stepping())

    def shapes(self, shape, group):
        out = {"exp_avg": shape} if group.get("beta1") is not None else {}
        if len(shape) == 2:
            out.update(exp_avg_sq_row=(shape[0],), exp_avg_sq_col=(shape[1],))
        else:
            out["exp_avg_sq"] = shape
        return out


# ---- any torch.optim / torch_optimizer class as a rule ---------------------------------

# first moments rotate linearly at a basis change, second moments with the squared rotation
_FIRST = ("exp_avg", "momentum_buffer", "grad_buffer", "i_buffer", "d_buffer", "previous_grad")
_SECOND = ("exp_avg_sq", "exp_avg_var", "max_exp_avg_sq", "max_exp_avg_var", "square_avg",
           "sum", "acc_delta", "exp_inf")
_OURS = ("params", "lr", "weight_decay", "maximize", "foreach", "capturable", "differentiable",
         "fused")  # applied in full space by the base, or implementation switches
_VALUES = "needs the parameter's own values"
DENIED = {
    "torch_optimizer.Lamb": f"its trust ratio ||w|| / ||update|| {_VALUES}",
    "torch_optimizer.LARS": f"its trust ratio ||w|| / ||grad|| {_VALUES}",
    "torch_optimizer.Shampoo": "its preconditioners are Kronecker factors of the full "
                               "matrix's gradient statistics, which a low-rank gradient lacks",
    "torch_optimizer.AdamP": f"its projection removing the radial component {_VALUES}",
    "torch_optimizer.SGDP": f"its projection removing the radial component {_VALUES}",
    "torch_optimizer.MADGRAD": f"its dual averaging from the initial point {_VALUES}",
    "torch_optimizer.AccSGD": f"its iterate mixes {_VALUES[6:]} into the momentum",
    "torch_optimizer.Lookahead": f"its slow weights are {_VALUES[6:]}",
    "torch_optimizer.Ranger": f"its lookahead slow weights are {_VALUES[6:]}",
    "torch_optimizer.RangerQH": f"its lookahead slow weights are {_VALUES[6:]}",
    "torch_optimizer.RangerVA": f"its lookahead slow weights are {_VALUES[6:]}",
    "torch_optimizer.Adafactor": f"its relative step size (scale_parameter) {_VALUES}",
    "torch_optimizer.Adahessian": "it needs Hessian-vector products through the parameter",
    "torch_optimizer.AdaBound": "its bounds on the step size are absolute (final_lr), so lr "
                                "is not a plain multiplier of its update",
    "torch_optimizer.Apollo": "its learning-rate warmup is inside the rule, so lr is not a "
                              "plain multiplier of its update",
    "torch_optimizer.SWATS": "its switch to SGD estimates a learning rate from lr-scaled "
                             "steps and keeps a string phase in its state",
    "torch.optim.Rprop": "its step sizes start at lr and are clamped to absolute bounds, so "
                         "lr is not a plain multiplier of its update",
    "torch.optim.ASGD": f"its averaged iterate {_VALUES}",
    "torch.optim.Adafactor": f"its relative step size {_VALUES}",
    "torch.optim.LBFGS": "it needs a closure and all parameters as one flat vector",
    "torch.optim.SparseAdam": "it needs sparse gradients",
}


def _qualname(cls: type) -> str:
    top = cls.__module__.split(".")[0]
    return f"torch.optim.{cls.__name__}" if top == "torch" else f"{top}.{cls.__name__}"


class _FirstValues(dict):
    """A torch optimizer's per-parameter state dict that remembers each entry's first
    value: the initial state, which torch optimizers create only inside ``step``."""

    def __init__(self):
        super().__init__()
        self.first = {}

    def __setitem__(self, key, value):
        if key not in self.first:
            self.first[key] = value.clone() if isinstance(value, Tensor) else value
        super().__setitem__(key, value)


class TorchRule(Rule):
    r"""A ``torch.optim`` or ``torch_optimizer`` optimizer class as an inner rule: its
    step runs on a proxy tensor of the (low-rank) gradient's shape whose ``.grad`` is the
    gradient, and the proxy's change is the direction, so its state lives in the
    low-rank shape, in this optimizer's flat state dict.

    The wrapped optimizer runs with ``lr=1`` and ``weight_decay=0`` on a zero proxy:
    :math:`d = -\Delta_{\text{proxy}}`. The base applies ``lr`` (so LR schedulers and
    per-group rates work) and decoupled ``weight_decay`` in full space, and ``maximize``
    on the gradient. That is the wrapped optimizer's own update exactly when its update
    is ``lr`` times something that does not depend on the parameter's values; both are
    checked on a small probe (two steps, zero vs random parameter, lr 1 vs 0.5), and
    known exceptions are refused by name with the reason (:data:`DENIED`: LAMB's and
    LARS's trust ratios, Shampoo's full-matrix preconditioners, Lookahead's slow
    weights, ...).

    Its other constructor options (``betas``, ``eps``, ``momentum``, ...; their names and
    defaults, :attr:`options`) are read from the param group, so they are per group and
    saved with ``state_dict``. Its state entries keep their names (``exp_avg``, ...);
    tensors of the proxy's shape and 0-d tensors are stored as they are, a number other
    than ``step`` as a 0-d float64/int64 tensor, and ``step`` is not stored: it is the
    base's step count, given to the wrapped optimizer in its own type. Initial values
    are the wrapped optimizer's own (e.g. Yogi's ``initial_accumulator``), learned from
    a probe step. A state it cannot keep flat (nested dicts, strings, other shapes)
    raises ``ValueError`` at construction. ``state_on_refresh="project"`` rotates the
    entries known as moments (``exp_avg``, ``momentum_buffer``, ... linearly;
    ``exp_avg_sq``, ``exp_avg_var``, ``square_avg``, ``sum``, ... with the squared
    rotation) and is refused for a state with other entries of the proxy's shape.

    The wrapped optimizer's state is float32 (also for a bf16 parameter that is not
    projected). One optimizer object is built per update (a few microseconds of Python).
    """

    def __init__(self, optimizer: type):
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise TypeError(f"expected a torch.optim.Optimizer subclass, got {optimizer!r}")
        for c in optimizer.__mro__:
            if _qualname(c) in DENIED:
                raise ValueError(f"{_qualname(optimizer)} cannot run in the low-rank space: "
                                 f"{DENIED[_qualname(c)]}")
        sig = inspect.signature(optimizer.__init__).parameters
        if "lr" not in sig:
            raise ValueError(f"{_qualname(optimizer)} has no lr argument: the base applies the "
                             "learning rate, so the wrapped rule must take lr=1")
        self.cls = optimizer
        self.options = {k: v.default for k, v in sig.items() if k not in _OURS
                        and k != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
        missing = [k for k, v in self.options.items() if v is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"{_qualname(optimizer)} needs the arguments {missing}, which a "
                             "rule cannot give")
        self._wd = {"weight_decay": 0.0} if "weight_decay" in sig else {}
        self._layouts = {}

    def __repr__(self):
        return f"TorchRule({_qualname(self.cls)})"

    def _make(self, proxy: Tensor, group: dict, lr: float = 1.0):
        opts = {k: group[k] for k in self.options}
        opt = self.cls([proxy], lr=lr, **self._wd, **opts)
        opt.state = collections.defaultdict(_FirstValues)
        return opt

    def _probe(self, group: dict, values: Tensor, grads, lr: float = 1.0):
        """The proxy's change over ``grads`` from ``values``, and the state's first values."""
        proxy = values.clone()
        opt = self._make(proxy, group, lr)
        for g in grads:
            proxy.grad = g.clone()
            opt.step()
        return proxy - values, opt.state[proxy].first

    def layout(self, group: dict) -> dict:
        """``{key: (kind, first value)}`` of the wrapped optimizer's state on a (2, 3)
        probe, checked once per option set (see the class docstring). Kinds: ``"step"``
        (the base's count), ``"full"`` (a tensor of the gradient's shape that starts
        constant), ``"lazy"`` (one the wrapped step creates from the first gradient, as
        SGD's ``momentum_buffer``), ``"0d"`` (a 0-d tensor), ``"number"`` (an int/float)."""
        key = repr(sorted((k, group[k]) for k in self.options))
        if key in self._layouts:
            return self._layouts[key]
        name, gen = _qualname(self.cls), torch.Generator().manual_seed(0)
        grads = [torch.randn(2, 3, generator=gen) for _ in range(2)]
        values = torch.randn(2, 3, generator=gen)
        try:
            d0, first = self._probe(group, torch.zeros(2, 3), grads)
            d1, _ = self._probe(group, values, grads)
            half, _ = self._probe(group, torch.zeros(2, 3), grads, lr=0.5)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{name} cannot run as a rule on a probe tensor: {exc}") from exc
        if not bool(torch.isfinite(d0).all()):
            raise ValueError(f"{name} gave non-finite updates on a probe with the options "
                             f"{ {k: group[k] for k in self.options} }: check their values")
        if not torch.allclose(d0, d1, rtol=1e-4, atol=1e-6):
            raise ValueError(f"{name} cannot run in the low-rank space: its update depends on "
                             "the parameter's values (a probe from zero and from random "
                             "values moved differently)")
        if not torch.allclose(half, 0.5 * d0, rtol=1e-4, atol=1e-7):
            raise ValueError(f"{name} cannot run in the low-rank space: lr is not a plain "
                             "multiplier of its update (lr 0.5 did not give half of lr 1)")
        out = {}
        for k, v in first.items():
            shape = getattr(v, "shape", None)
            if k == "step":
                out[k] = ("step", v)
            elif shape == (2, 3):
                out[k] = ("full", v) if bool((v == v.flatten()[0]).all()) else ("lazy", v)
            elif shape == ():
                out[k] = ("0d", v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = ("number", v)
            else:
                raise ValueError(f"{name}'s state {k!r} ({type(v).__name__} "
                                 f"{'' if shape is None else tuple(shape)}) cannot be kept "
                                 "in a flat low-rank state (tensors of the gradient's shape "
                                 "and numbers only)")
        self._layouts[key] = out
        return out

    def validate(self, group):
        layout = self.layout(group)
        if group.get("rank") is not None and group.get("state_on_refresh") == "project":
            unknown = [k for k, (kind, _) in layout.items() if kind in ("full", "lazy")
                       and k not in _FIRST + _SECOND]
            check(not unknown, "state_on_refresh", "project", f"'keep' or 'reset' for "
                  f"{_qualname(self.cls)}: its state {unknown} is not a known moment, so it "
                  "cannot be rotated into a new basis")

    def init(self, state, like, group):
        for k, (kind, v) in self.layout(group).items():
            if kind == "lazy" and like.device.type != "meta":
                state.pop(k, None)  # the wrapped step creates it from the next gradient
            elif kind in ("full", "lazy"):
                state[k] = torch.full(like.shape, v.flatten()[0].item(), dtype=torch.float32,
                                      device=like.device)
            elif kind == "0d":
                state[k] = v.to(like.device, copy=True)
            elif kind == "number":
                state[k] = torch.tensor(v, dtype=torch.float64 if isinstance(v, float)
                                        else torch.int64, device=like.device)

    def update(self, state, g, step, group, low_rank):
        layout = self.layout(group)
        proxy = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        proxy.grad = g.float()
        opt = self._make(proxy, group)
        inner = opt.state[proxy] = {}
        for k, (kind, v) in layout.items():
            if kind == "step":
                inner[k] = torch.tensor(float(step - 1)) if isinstance(v, Tensor) else step - 1
            elif kind == "number":
                inner[k] = type(v)(state[k].item())
            elif k in state:
                inner[k] = state[k]  # updated in place by the wrapped step
        opt.step()
        for k, (kind, v) in layout.items():
            if kind == "number":
                state[k].fill_(inner[k])
            elif kind != "step" and inner[k] is not state.get(k):  # new, or reassigned
                state[k] = inner[k].float() if kind != "0d" else inner[k]
        return proxy.neg_()

    def shapes(self, shape, group):
        return {k: shape if kind in ("full", "lazy") else ()
                for k, (kind, _) in self.layout(group).items() if kind != "step"}

    def transport_(self, state, move):
        for k in _FIRST + _SECOND:
            if k in state and state[k].dim():
                state[k] = move(state[k], k in _SECOND).to(state[k].dtype)
