"""Q-GaLore: quantized GaLore (Zhang et al., 2024, arXiv:2407.08296)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from . import quant, rules
from ._layers import plain_linear, swap_linears
from ._base import LowRankOptimizer
from ._checks import check_int
from .galore import _galore_defaults
from .projector import Projector
from .refresh import LazyCosine

__all__ = ["QGaLoreAdamW8bit", "QuantWeight", "QuantLinear", "quantize_weights"]

_aten = torch.ops.aten


class QGaLoreAdamW8bit(LowRankOptimizer):
    rule = rules.Adam8bit()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: Optional[int] = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 proj_bits: Optional[int] = 4, proj_group_size: int = 256,
                 cos_threshold: float = 0.4, gamma_proj: float = 2, queue_size: int = 5,
                 stochastic_round: bool = True, seed: int = 0, svd: str = "exact",
                 state_on_refresh: str = "project", stagger: bool = True,
                 min_8bit_size: int = 4096, *, maximize: bool = False):
        super().__init__(params, _galore_defaults(
            lr, weight_decay, rank, update_proj_gap, scale, proj_type, svd, state_on_refresh,
            stagger, maximize, betas=betas, eps=eps, min_8bit_size=min_8bit_size,
            proj_bits=proj_bits, proj_group_size=proj_group_size, cos_threshold=cos_threshold,
            gamma_proj=gamma_proj, queue_size=queue_size, stochastic_round=stochastic_round,
            seed=seed))

    def _validate_group(self, g: dict) -> None:
        super()._validate_group(g)
        check_int("seed", g["seed"], 0)
        if g.get("rank") is not None:
            self._projector(g)
            LazyCosine(g["update_proj_gap"], 0, threshold=g["cos_threshold"],
                       queue_size=g["queue_size"], growth=g["gamma_proj"])

    def _projector(self, group: dict) -> Projector:
        return Projector(group["rank"], group["proj_type"], group["svd"],
                         quant_bits=group["proj_bits"], quant_group_size=group["proj_group_size"])

    def _refresh_policy(self, p, group: dict):
        return LazyCosine(group["update_proj_gap"], self._phase(p, group),
                          threshold=group["cos_threshold"], queue_size=group["queue_size"],
                          growth=group["gamma_proj"])


QGaLoreAdamW8bit.__doc__ = r"""Q-GaLore: GaLore with quantized weights, projections and moments.

Q-GaLore keeps GaLore's update (see :class:`GaLoreAdamW`; glossary: :math:`\eta` = ``lr``,
:math:`\alpha` = ``scale``, :math:`r` = ``rank``, :math:`T` = ``update_proj_gap``) and
quantizes everything that is large:

.. math::
    \begin{aligned}
    &\textbf{if refresh due}: P \leftarrow \mathrm{Q}_4(\text{top-}r\text{ SVD of } G_t),
      \quad s = \|P_{old}^\top P_{new}\|_F^2 / r \\
    &\quad \text{queue} \leftarrow \text{last } k \text{ values of } s;\ \
      \textbf{if } |\text{queue}| = k \wedge \overline{\text{queue}} \ge \tau:
      T_\ell \leftarrow \gamma\,T_\ell \\
    &R_t = \mathrm{project}(G_t;\ \mathrm{deq}(P)),\quad N_t = \mathrm{Adam8bit}(R_t) \\
    &\hat W = \mathrm{deq}(W_t^{int8}) \cdot (1-\eta\lambda) - \eta\,\alpha\,
      \mathrm{project\_back}(N_t) \\
    &W_{t+1}^{int8} = \mathrm{SR}\big(\hat W / s_g\big) \quad
      (\text{stochastic rounding, fresh per-group min-max ranges})
    \end{aligned}

* **INT8 weights** come from :func:`lowrank_optim.quantize_weights`, which swaps Linear
  layers for :class:`~lowrank_optim.nn.QuantLinear` (uint8 codes, per-group scales, no
  float master copy). Stochastic rounding (:math:`\mathbb{E}[\mathrm{SR}(x)] = x`) keeps
  updates smaller than one quantization step on average; ``stochastic_round=False``
  rounds to nearest. Unquantized parameters (embeddings, norms, head, biases) are
  updated as by :class:`GaLoreAdamW8bit`.
* **INT4 projection**: the basis is stored as ``proj_bits``-bit asymmetric min-max codes
  in groups of ``proj_group_size`` (packed two per byte), quantized once per refresh and
  dequantized on use. ``proj_bits=None`` keeps it float32.
* **Lazy layer-wise refresh** (:class:`~lowrank_optim.refresh.LazyCosine`): after each
  SVD the similarity :math:`s` of the new subspace to the previous one is recorded;
  when the last ``queue_size`` values average at least ``cos_threshold``, that matrix's
  gap is multiplied by ``gamma_proj``. Similarity here is the subspace overlap
  :math:`\|P_{old}^\top P_{new}\|_F^2/r \in [0, 1]` over all :math:`r` directions, which
  is insensitive to the arbitrary signs and order of singular vectors; the reference
  uses the signed cosine of the first singular vector only. ``gamma_proj=1`` turns
  laziness off.
* **8-bit moments**: blockwise 8-bit Adam states as in :class:`GaLoreAdamW8bit`.

With an unquantized model, ``proj_bits=None``, ``gamma_proj=1`` and a ``min_8bit_size``
larger than every state, this optimizer is :class:`GaLoreAdamW`.

Args:
    params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type, svd,
    state_on_refresh, stagger, min_8bit_size, maximize: as :class:`GaLoreAdamW8bit`.
    proj_bits (int or None): bits of the stored basis. Default 4.
    proj_group_size (int): elements per scale of the basis. Default 256.
    cos_threshold (float): :math:`\tau`, in [0, 1]. Default 0.4.
    gamma_proj (float): :math:`\gamma \ge 1`, gap growth. Default 2.
    queue_size (int): :math:`k`. Default 5.
    stochastic_round (bool): SR (default) or round-to-nearest for INT8 weights.
    seed (int): seed of the rounding noise (with the parameter's index and step).

Example:
    >>> import torch, lowrank_optim as lo
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    >>> model = lo.quantize_weights(model, bits=8, group_size=256, target_modules=None)
    >>> opt = lo.QGaLoreAdamW8bit(model.parameters(), lr=1e-2, rank=16)
    >>> model(torch.randn(4, 64)).square().mean().backward(); opt.step(); opt.zero_grad()

Reference: Z. Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
Layer-Adaptive Low-Rank Gradients", 2024, https://arxiv.org/abs/2407.08296. Reference
learning rates: 0.015 (60M/130M), 0.01 (350M/1B), 0.004 (7B).
"""


# ---- INT8 weights ----------------------------------------------------------------------


class QuantWeight(Tensor):
    """A float32 weight, as autograd sees it, stored as ``bits``-bit integer codes with
    per-group scales: ``codes`` (uint8, one per element, the weight's shape), ``scale`` and
    ``offset`` (float32 per group of ``group_size`` row-major elements; ``offset`` is
    ``None`` when symmetric; :mod:`lowrank_optim.quant`). No float copy exists.

    A tensor subclass (the design of torchao's quantized-training weight): as a
    ``Parameter`` it requires grad and autograd accumulates an ordinary float32 ``.grad``
    for it, so ``clip_grad_norm_``, ``GradScaler.unscale_``, DDP's gradient buckets and
    ``register_post_accumulate_grad_hook`` treat it like any parameter, and a layer used
    twice gets one summed gradient. Updates go through the weight type:
    :meth:`requantize_` stores a float tensor with fresh per-group ranges (stochastic
    rounding on request, so updates smaller than one step survive on average); ``copy_``
    from a float tensor requantizes to nearest, from an integer tensor writes the codes;
    any other in-place op (a ``torch.optim`` optimizer's ``add_``) runs on the dequantized
    weight and is stored back by stochastic rounding. Every other op sees the dequantized
    float32 weight. ``.to(device)`` moves the codes; a dtype cast leaves them as they are.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, offset: Optional[Tensor], bits: int,
                group_size: int, requires_grad: bool = False):
        return Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32,
                                             device=codes.device, requires_grad=requires_grad)

    def __init__(self, codes, scale, offset, bits, group_size, requires_grad=False):
        self.codes, self.scale, self.offset = codes, scale, offset
        self.bits, self.group_size = bits, group_size

    @classmethod
    def from_float(cls, w: Tensor, bits: int = 8, group_size: int = 256,
                   symmetric: bool = False) -> "QuantWeight":
        q = quant.quantize(w, bits, group_size, symmetric, pack=False)
        return cls(q.codes.view(w.shape), q.scale, q.offset, bits, group_size)

    def qtensor(self) -> quant.QTensor:
        return quant.QTensor(self.codes.reshape(-1), self.scale, self.offset, self.shape,
                             self.bits, self.group_size, "sym" if self.offset is None else "asym")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.qtensor().dequantize(dtype)

    def requantize_(self, w: Tensor, stochastic: bool = False,
                    generator: Optional[torch.Generator] = None) -> "QuantWeight":
        """Store the float tensor ``w`` in place: fresh per-group ranges, codes rounded to
        nearest or (``stochastic``) stochastically with ``generator``'s noise."""
        q = quant.quantize(w, self.bits, self.group_size, self.offset is None,
                           stochastic=stochastic, generator=generator, pack=False)
        self.codes.copy_(q.codes.view(self.codes.shape))
        self.scale.copy_(q.scale)
        if q.offset is not None:
            self.offset.copy_(q.offset)
        return self

    def _map(self, fn) -> "QuantWeight":
        return QuantWeight(fn(self.codes), fn(self.scale),
                           None if self.offset is None else fn(self.offset), self.bits,
                           self.group_size)

    def __tensor_flatten__(self):
        return ["codes", "scale"] + ([] if self.offset is None else ["offset"]), \
            (self.bits, self.group_size)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["codes"], inner["scale"], inner.get("offset"), *meta)

    def __repr__(self) -> str:
        return (f"QuantWeight(shape={tuple(self.shape)}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.offset is None}, "
                f"device={self.device})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0]
        if func in (_aten.detach.default, _aten.alias.default):
            return x._map(lambda t: t)  # shares the codes and scales
        if func is _aten.clone.default:
            return x._map(torch.clone)
        if func is _aten._to_copy.default:  # moves; a dtype cast leaves codes as codes
            device = kwargs.get("device") or x.device
            return x._map(lambda t: t.to(device, non_blocking=kwargs.get("non_blocking", False)))
        if func is _aten.copy_.default:
            src = args[1]
            if isinstance(src, QuantWeight):
                x.codes.copy_(src.codes), x.scale.copy_(src.scale)
                if x.offset is not None:
                    x.offset.copy_(src.offset)
            elif src.is_floating_point():
                x.requantize_(src)
            else:
                x.codes.copy_(src)
            return x
        plain = tree_map(lambda t: t.dequantize() if isinstance(t, QuantWeight) else t,
                         (args, kwargs))
        if func._schema.is_mutable and isinstance(x, QuantWeight):  # e.g. torch.optim's add_
            w = plain[0][0]
            func(*plain[0], **plain[1])
            return x.requantize_(w, stochastic=True)
        return func(*plain[0], **plain[1])


class _QuantLinearFn(torch.autograd.Function):
    """``y = x·deq(W)ᵀ + b``; saves only ``x`` and dequantizes ``W`` again in backward,
    so no float weight outlives one layer's forward or backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        ctx.save_for_backward(x)
        return nn.functional.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight.dequantize(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2.float().T @ x.reshape(-1, x.shape[-1]).float()
        if ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(grad_out.dtype)
        return grad_x, grad_w, grad_b


class QuantLinear(nn.Module):
    """``nn.Linear`` whose ``weight`` is a :class:`QuantWeight` ``Parameter``.

    ``state_dict()`` holds plain tensors: ``weight`` (the uint8 codes),
    ``weight_scale`` and (asymmetric) ``weight_offset`` (float32), and ``bias``, so it
    loads with ``torch.load(..., weights_only=True)``. ``model.to(torch.bfloat16)`` casts
    the bias and leaves the codes and float32 scales (and the float32 gradient) as they are.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits (int): code width, 2 to 8 (codes are stored one per byte). Default 8.
        group_size (int): elements per scale, along the row-major weight. Default 256.
        symmetric (bool): absmax codes (True) or min-max codes with an offset (False,
            Q-GaLore's choice). Default False.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int = 256, symmetric: bool = False, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        quant._check(bits, group_size, "sym" if symmetric else "asym")
        self.in_features, self.out_features = in_features, out_features
        groups = -(-in_features * out_features // group_size)
        codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(QuantWeight(
            codes, torch.ones(groups, device=device),
            None if symmetric else torch.zeros(groups, device=device), bits, group_size))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) \
            if bias else None

    bits = property(lambda self: self.weight.bits)
    group_size = property(lambda self: self.weight.group_size)
    symmetric = property(lambda self: self.weight.offset is None)
    weight_scale = property(lambda self: self.weight.scale)
    weight_offset = property(lambda self: self.weight.offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 256,
                    symmetric: bool = False) -> "QuantLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits,
                    group_size, symmetric, device=w.device,
                    dtype=None if linear.bias is None else linear.bias.dtype)
        layer.weight.requantize_(w)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.dequantize(dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """The plain ``nn.Linear`` this layer computes (dequantized weight), in ``dtype``
        (default: the bias's dtype, else float32)."""
        return plain_linear(self, self.dequantized_weight(), self.bias, dtype)

    def _apply(self, fn, recurse=True):
        # the weight stays float32 under a dtype cast, and so does its gradient
        grad, self.weight.grad = self.weight.grad, None
        super()._apply(fn, recurse)
        if grad is not None:
            self.weight.grad = grad.to(self.weight.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return _QuantLinearFn.apply(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        for name, t in (("weight", w.codes), ("weight_scale", w.scale),
                        ("weight_offset", w.offset)):
            if t is not None:
                destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # ``weight`` (the codes) loads through QuantWeight.copy_; the scales here
        extra = {prefix + "weight_" + n: t for n in ("scale", "offset")
                 if (t := getattr(self.weight, n)) is not None}
        for key, t in extra.items():
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
            elif state_dict[key].shape != t.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(state_dict[key].shape)}, the shape in current "
                                  f"model is {tuple(t.shape)}.")
            else:
                t.copy_(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in extra]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int = 256,
                     target_modules: Optional[Iterable[str]] = ("attn", "mlp"),
                     symmetric: bool = False) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by a :class:`QuantLinear`; returns
    ``model``. Raises ``ValueError`` when nothing matches."""
    return swap_linears(model, target_modules, lambda linear: QuantLinear.from_linear(
        linear, bits, group_size, symmetric))


