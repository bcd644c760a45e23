"""What the methods' layers share: swapping ``nn.Linear`` modules in place, keeping
float32 tensors float32 in a cast model, and going back to plain ``nn.Linear``."""
from __future__ import annotations

import itertools
import weakref
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["swap_linears", "Float32Tensors", "to_plain", "register_layer", "layer_by_key"]

# Every live layer whose backward runs one of the package's custom ops (LoQTLinear,
# GaLoreLinear), by its key: the op is given the key (an int, which torch.compile passes
# as a constant) and finds its layer here.
_LAYERS: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_layer(layer: nn.Module) -> int:
    """A new key for ``layer`` in the registry :func:`layer_by_key` reads; a copy of a
    layer (deepcopy, unpickling) registers again, for a key of its own."""
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


def layer_by_key(key: int) -> nn.Module:
    """The live layer registered under ``key`` (:func:`register_layer`)."""
    return _LAYERS[key]


def swap_linears(model: nn.Module, target_modules: Optional[Iterable[str]], make) -> nn.Module:
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



class Float32Tensors(nn.Module):
    """A module whose tensors named in ``FLOAT32`` (parameters or buffers) move with the
    module but never change dtype: ``model.to(torch.bfloat16)`` must not round float32
    quantization scales."""

    FLOAT32: tuple = ()

    def _apply(self, fn, recurse=True):
        keep = {k: t.detach() for k in self.FLOAT32 if (t := getattr(self, k, None)) is not None}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            t = getattr(self, k)
            if t.dtype == old.dtype:
                continue
            restored = old.to(t.device)
            if isinstance(t, nn.Parameter):
                t.data = restored
                if t.grad is not None:
                    t.grad = t.grad.to(old.dtype)
            else:
                self._buffers[k] = restored
        return self


def to_plain(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every layer that has a ``to_linear()`` method (``QuantLinear``,
    ``LoQTLinear``) by the plain ``nn.Linear`` it computes (dequantized; LoQT's ``s·P·B``
    merged), in ``dtype`` (default: the layer's own, see its ``to_linear``); returns
    ``model``. The result is an ordinary model to evaluate, share or load elsewhere (its
    ``state_dict()`` has the keys of the model before ``quantize_weights`` /
    ``prepare_loqt``)."""
    swaps = [(name, m) for name, m in model.named_modules() if hasattr(m, "to_linear")]
    for name, layer in swaps:
        parent_name, _, child = name.rpartition(".")
        linear = layer.to_linear(dtype)
        if not parent_name and not child:
            return linear
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def plain_linear(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 dtype: Optional[torch.dtype]) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` (copies), in ``dtype`` (default: the
    bias's dtype, else ``weight``'s)."""
    dtype = dtype or (bias.dtype if bias is not None else weight.dtype)
    out = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                    device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out
