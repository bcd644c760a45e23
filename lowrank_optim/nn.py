r"""Layers whose weights are stored quantized, and the helpers that swap them in.

:class:`QuantLinear` (Q-GaLore) stores its weight as integer codes with per-group scales
(:mod:`lowrank_optim.quant`): ``weight`` is a ``uint8`` ``nn.Parameter`` of the logical
shape ``(out_features, in_features)`` that does not require grad, and
``weight_scale``/``weight_offset`` are buffers, so all three are in ``state_dict()`` and
move with ``.to()``. No float copy of the weight is kept: forward and backward each
dequantize this one layer's weight, use it, and drop it.

A ``uint8`` tensor cannot hold a float ``.grad``. The gradient with respect to the
dequantized weight, :math:`\partial L/\partial \hat W = \sum_b \delta_b^\top x_b`, is
accumulated by backward into the attribute ``weight.quant_grad`` (float32); this
package's optimizers read it there, update the weight through the codes, and free it.
When per-layer hooks are registered (:func:`lowrank_optim.hooks.register_hooks`),
backward calls the hook right after accumulating, as autograd does for float leaves.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from . import quant

__all__ = ["QuantLinear", "quantize_weights", "is_quantized", "quant_grad",
           "dequantized_weight", "store_weight_"]


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, module):
        w = module.dequantized_weight(x.dtype)
        ctx.module = module
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        module = ctx.module
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ module.dequantized_weight(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
        gw = g2.T @ x.reshape(-1, x.shape[-1]).float()
        p = module.weight
        prev = getattr(p, "quant_grad", None)
        p.quant_grad = gw if prev is None else prev.add_(gw)
        hook = getattr(p, "lowrank_hook", None)
        if hook is not None:
            hook(p)
        grad_b = g2.sum(0).to(grad_out.dtype) if ctx.has_bias else None
        return grad_x, grad_b, None


class QuantLinear(nn.Module):
    """``nn.Linear`` with an integer-coded weight (see the module docstring).

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
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = -(-in_features * out_features // group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8,
                                               device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(groups, device=device))
        self.register_buffer("weight_offset", None if symmetric else
                             torch.zeros(groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) \
            if bias else None
        self._owner_link()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the float32 scales: move them only
        keep = {k: b for k in ("weight_scale", "weight_offset")
                if (b := self._buffers.get(k)) is not None}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            self._buffers[k] = old.to(self._buffers[k].device)
        return self

    def _owner_link(self) -> None:
        # the optimizer reaches the scales through the parameter; re-linked on every
        # forward so copies (deepcopy, .to()) stay consistent
        self.weight.quant_owner = self

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 256,
                    symmetric: bool = False) -> "QuantLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits,
                    group_size, symmetric, device=w.device,
                    dtype=None if linear.bias is None else linear.bias.dtype)
        layer.store_weight_(quant.quantize(w, bits, group_size, symmetric, pack=False))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def qtensor(self) -> quant.QTensor:
        fmt = "sym" if self.symmetric else "asym"
        return quant.QTensor(self.weight.data.reshape(-1), self.weight_scale, self.weight_offset,
                             self.weight.shape, self.bits, self.group_size, fmt)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.qtensor().dequantize(dtype)

    def store_weight_(self, q: quant.QTensor) -> None:
        """Write new codes and scales in place (they keep their storage and device)."""
        self.weight.data.copy_(q.codes.view(self.weight.shape))
        self.weight_scale.copy_(q.scale)
        if q.offset is not None:
            self.weight_offset.copy_(q.offset)

    def forward(self, x: Tensor) -> Tensor:
        self._owner_link()
        return _QuantLinearFn.apply(x, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}")


def is_quantized(p: Tensor) -> bool:
    """True for the integer-coded weight of a :class:`QuantLinear`."""
    return getattr(p, "quant_owner", None) is not None and not p.is_floating_point()


def quant_grad(p: Tensor) -> Optional[Tensor]:
    return getattr(p, "quant_grad", None)


def dequantized_weight(p: Tensor) -> Tensor:
    return p.quant_owner.dequantized_weight()


def store_weight_(p: Tensor, w: Tensor, stochastic: bool,
                  generator: Optional[torch.Generator] = None) -> None:
    """Requantize the float weight ``w`` into ``p``'s codes (fresh per-group ranges),
    with stochastic rounding when asked so small updates survive on average."""
    owner = p.quant_owner
    owner.store_weight_(quant.quantize(w, owner.bits, owner.group_size, owner.symmetric,
                                       stochastic=stochastic, generator=generator, pack=False))


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int = 256,
                     target_modules: Optional[Iterable[str]] = ("attn", "mlp"),
                     symmetric: bool = False) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by a :class:`QuantLinear`; returns
    ``model``. Raises ``ValueError`` when nothing matches."""
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
        setattr(parent, child, QuantLinear.from_linear(linear, bits, group_size, symmetric))
    return model
