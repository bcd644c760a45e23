r"""Layers whose weights are stored quantized, and the helpers that swap them in.

* :class:`QuantLinear` (Q-GaLore): ``nn.Linear`` whose weight is a :class:`QuantWeight`.
* :class:`LoQTLinear` (LoQT): a frozen quantized weight plus a frozen basis :math:`P` and a
  trainable low-rank factor :math:`B` (see its docstring).

:class:`QuantWeight` is a float32 tensor *as autograd sees it* that stores only integer
codes (``uint8``, one per element) and per-group float32 scales (and offsets)
(:mod:`lowrank_optim.quant`); no float copy of the weight exists. It is a tensor subclass
(the design of torchao's quantized-training weight): as a ``Parameter`` it requires grad,
and autograd accumulates an ordinary float32 ``.grad`` for it, so
``clip_grad_norm_``, ``GradScaler.unscale_``, DDP's gradient buckets and
``register_post_accumulate_grad_hook`` treat it like any parameter, and a layer used twice
gets one summed gradient. Updates go through the weight type: ``requantize_(w)`` stores a
float tensor with fresh per-group ranges (stochastic rounding on request, so small updates
survive on average); ``copy_`` from a float tensor requantizes to nearest, from an integer
tensor writes the codes; any other in-place op (a ``torch.optim`` optimizer's ``add_``)
runs on the dequantized weight and is stored back by stochastic rounding. Every other op
sees the dequantized float32 weight.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from . import distributed, quant
from .projector import RIGHT, Projector, choose_side

__all__ = ["QuantWeight", "QuantLinear", "quantize_weights", "LoQTLinear", "prepare_loqt"]

_aten = torch.ops.aten


class QuantWeight(Tensor):
    """A float32 weight stored as ``bits``-bit codes with per-group scales (see the module
    docstring). ``codes`` (uint8, the weight's shape), ``scale`` and ``offset`` (float32
    per group of ``group_size`` row-major elements; ``offset`` is ``None`` when symmetric)."""

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


def _keep_fp32_apply(self, fn, recurse=True):
    """``nn.Module._apply`` that moves, but never casts, the buffers named in
    ``self._FP32_BUFFERS``: ``model.to(torch.bfloat16)`` must not round float32 scales."""
    keep = {k: b for k in self._FP32_BUFFERS if (b := self._buffers.get(k)) is not None}
    nn.Module._apply(self, fn, recurse)
    for k, old in keep.items():
        self._buffers[k] = old.to(self._buffers[k].device)
    return self


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


def _swap_linears(model: nn.Module, target_modules: Optional[Iterable[str]], make) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by ``make(linear)``; returns ``model``.
    Raises ``ValueError`` when nothing matches."""
    if isinstance(target_modules, str):
        raise TypeError("target_modules must be an iterable of strings, not a string")
    targets = None if target_modules is None else tuple(target_modules)
    swaps = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear
             and (targets is None or any(t in name for t in targets))]
    if not swaps:
        raise ValueError(f"No nn.Linear module name contains any of {targets!r}")
    for name, linear in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear))
    return model


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int = 256,
                     target_modules: Optional[Iterable[str]] = ("attn", "mlp"),
                     symmetric: bool = False) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by a :class:`QuantLinear`; returns
    ``model``. Raises ``ValueError`` when nothing matches."""
    return _swap_linears(model, target_modules, lambda linear: QuantLinear.from_linear(
        linear, bits, group_size, symmetric))


# ---- LoQT ------------------------------------------------------------------------------


class _LoQTFn(torch.autograd.Function):
    """``y = x·deq(Q)ᵀ + s·x·ΔWᵀ + b`` with ``ΔW`` = ``B·Pᵀ`` (RIGHT) or ``P·B`` (LEFT).

    Saves only ``x``; backward re-dequantizes ``Q`` for ``∂L/∂x`` and returns ``∂L/∂B`` in
    low rank. While the layer is armed for a merge it also forms this layer's dense weight
    gradient once, takes the new basis from it and drops it (``LoQTLinear._capture``).
    """

    @staticmethod
    def forward(ctx, x, b, bias, layer):
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.save_for_backward(x)
        p = layer.projection(x.dtype)
        low = (x @ p) @ b.to(x.dtype).T if layer.side == RIGHT else (x @ b.to(x.dtype).T) @ p.T
        return nn.functional.linear(x, layer.base_weight(x.dtype), bias).add_(low, alpha=layer.scale)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer, s, dtype = ctx.layer, ctx.layer.scale, grad_out.dtype
        b = layer.B.to(dtype)
        p = layer.projection(dtype)
        grad_x = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            low = (grad_out @ b) @ p.T if layer.side == RIGHT else (grad_out @ p) @ b
            grad_x = (grad_out @ layer.base_weight(dtype)).add_(low, alpha=s)
        d2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            new = layer._capture(d2, x2)  # the new basis at a merge step, else None
            p = p if new is None else new.to(dtype)
            grad_b = s * (d2.T @ (x2 @ p) if layer.side == RIGHT else (d2 @ p).T @ x2)
            grad_b = grad_b.to(layer.B.dtype)
        if ctx.has_bias:
            grad_bias = d2.sum(0)
        return grad_x, grad_b, grad_bias, None


class LoQTLinear(nn.Module):
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
    double quantization). Chosen by measurement (``benchmarks/results/loqt_quant.md``: main
    job, 3 seeds, validation perplexity, ``state_on_merge="project"``): NF4/64 with an
    INT4 ``P`` (this package's earlier default) 3.932, NF4/32 + double quantization 3.920,
    INT8 ``P`` 3.922, both 3.899 (lower on every seed), against 3.898 for LoQT without any
    quantization and 3.906 for :class:`~lowrank_optim.GaLoreAdamW`. The INT8 ``P`` costs
    :math:`4\,r\min(m,n)` bits more per layer, the finer ``Q`` blocks save
    :math:`0.24\,mn`: at rank :math:`r \le 0.06\max(m,n)` the two cancel, at LLaMA-1B's
    rank 512 weights + optimizer state grow 1.5% (``benchmarks/results/memory.md``).

    Forward is ``y = x·deq(Q)ᵀ + s·(x·P)·Bᵀ`` (or ``s·(x·Bᵀ)·Pᵀ``): no dense weight is
    trained and no dense weight gradient exists, except that when
    :class:`~lowrank_optim.LoQTAdamW` arms the layer before a merge, its backward forms
    this layer's :math:`G` once (averaged over ranks under ``torch.distributed``), takes the
    new top-``rank`` basis from its SVD (quantized as above), returns ``∂L/∂B`` in the new
    basis and frees :math:`G` before the next layer's backward runs. Further micro-batches
    of the same step reuse that basis. :meth:`merge_` then folds :math:`B` into :math:`Q`.

    Until its first merge ``P`` is zero, so the layer computes ``deq(Q)·x``.
    """

    _FP32_BUFFERS = ("weight_scale", "weight_offset", "weight_scale_scale",
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
        self._pending = None  # (projector state with the new basis, rotations)
        self.B.loqt_owner = self

    def _register_codes(self, name, numel, bits, group_size, offset, kw) -> None:
        # zero codes, scale 1, offset 0: dequantizes to exactly zero
        self.register_buffer(f"{name}_codes", torch.zeros(
            (numel + 1) // 2 if bits <= 4 else numel, dtype=torch.uint8, **kw))
        groups = -(-numel // group_size)
        self.register_buffer(f"{name}_scale", torch.ones(groups, **kw))
        if offset:
            self.register_buffer(f"{name}_offset", torch.zeros(groups, **kw))

    _apply = _keep_fp32_apply

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
        if self.bits is None:
            return self.weight.to(dtype)
        fmt = "nf4" if self.quant_type == "nf4" else "asym"
        q = quant.get(self._buffers, "weight", (self.out_features, self.in_features),
                      self.bits, self.group_size, fmt)
        return q.dequantize(dtype)

    def _proj_state(self, with_side: bool = True) -> dict:
        st = {k: v for k, v in self._buffers.items() if k.startswith("proj")}
        if with_side:
            st["proj_side"] = self.side
        return st

    def projection(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``deq(P)``, ``min(m, n) × rank`` (zero before the first merge)."""
        return self._basis(self._proj_state()).to(dtype)

    def _basis(self, st: dict) -> Tensor:
        """The one-sided float32 basis stored in projector state ``st``."""
        like = torch.empty(self.out_features, self.in_features, device="meta")
        left, right = self.projector._bases(st, like)
        return left if right is None else right

    def _delta(self, p: Tensor, b: Tensor) -> Tensor:
        return b @ p.T if self.side == RIGHT else p @ b

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight this layer computes with, ``deq(Q) + s·ΔW``."""
        delta = self._delta(self.projection(), self.B.detach().float())
        # out of place: an unquantized layer's base_weight() is its buffer itself
        return torch.add(self.base_weight(torch.float32), delta, alpha=self.scale).to(dtype)

    # ---- merges -------------------------------------------------------------------------
    def _capture(self, d2: Tensor, x2: Tensor) -> Optional[Tensor]:
        """At an armed backward: the new basis (float32), computed on first use from this
        micro-batch's dense gradient ``d2ᵀ·x2``, which is freed on return."""
        if not self.capture:
            return None
        if self._pending is None:
            g = distributed.all_reduce_mean_(d2.T.float() @ x2.float())
            if self.capture < 0:  # a maximizing optimizer: the basis of the descent direction
                g.neg_()
            st = self._proj_state(with_side=bool(self.merges))
            rots = self.projector.refresh(st, g, seed=int(self.merges))
            del g
            st["proj_side"] = self.side
            self._pending = (st, rots)
        return self._basis(self._pending[0])

    @property
    def merge_ready(self) -> bool:
        """True once an armed backward has captured the basis for the next merge."""
        return self._pending is not None

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
        if self._pending is None:
            raise RuntimeError("LoQTLinear.merge_: no basis captured; arm the layer "
                               "(layer.capture = 1) and run a backward pass first")
        st, rots = self._pending
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
        self.B.loqt_owner = self  # re-linked: copies (deepcopy, .to()) stay consistent
        return _LoQTFn.apply(x, self.B, self.bias, self)

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
    return _swap_linears(model, target_modules, lambda linear: LoQTLinear.from_linear(
        linear, rank=rank, scale=scale, bits=bits, **kwargs))
