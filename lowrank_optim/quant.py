r"""Block-wise integer quantization, shared by every method of the package.

A tensor :math:`x` is flattened (row-major) and cut into groups of ``group_size``
consecutive elements; a last, short group is padded by repeating the final element,
which leaves that group's range unchanged. Each group :math:`g` gets its own scale:

* **asymmetric (min-max)**, codes :math:`q \in [0, 2^b-1]`:
  :math:`s_g = (\max g - \min g)/(2^b-1)`, offset :math:`o_g = \min g`,
  :math:`q = \mathrm{round}((x - o_g)/s_g)`, :math:`\hat x = s_g q + o_g`.
* **symmetric (absmax)**, signed values :math:`k \in [-(2^{b-1}-1), 2^{b-1}-1]`:
  :math:`s_g = \max|g| / (2^{b-1}-1)`, :math:`k = \mathrm{round}(x/s_g)`,
  :math:`\hat x = s_g k`. The code stored is :math:`q = k + 2^{b-1}` so that every
  format keeps unsigned codes.

With round-to-nearest, :math:`|x - \hat x| \le s_g/2` (half a step of its group).
With stochastic rounding, :math:`q = \lfloor y + u \rfloor`, :math:`u \sim U[0, 1)`,
so :math:`\mathbb{E}[q] = y`: updates smaller than one step survive on average.

A group whose values are all equal gets scale 1 (asymmetric: exact; symmetric: exact
when the value is 0). The offset is a float, not a rounded integer zero-point, so the
half-step bound holds for every input, including groups that do not contain 0.

Codes of ``bits <= 4`` are packed two per byte (low nibble first) unless ``pack=False``. NF4 (the 16-level
normal-float code of QLoRA, absmax blocks) is quantized by ``bitsandbytes.functional``
and dequantized with plain torch ops (:func:`nf4_dequantize`). Its
absmax can itself be quantized (QLoRA's *double quantization*): 8-bit asymmetric codes in
groups of 256 blocks, so a block of 32 weights costs 4 + 8/32 + 64/(32·256) ≈ 4.26 bits per
weight instead of 5 (block 64 without it: 4.5). The absmax is then a nested
:class:`QTensor` (its relative error, about 0.1% of a group's absmax range, is small
against NF4's own, about 9% of the weights' norm).

A quantized value is a :class:`QTensor`: plain tensors plus its shape and format. In
optimizer state or module buffers it is kept flat, as ``<name>_codes``,
``<name>_scale`` and (asymmetric) ``<name>_offset`` (see :func:`put` and :func:`get`),
so ``torch.load(..., weights_only=True)`` works and nothing is a Python object.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import check, check_int, is_int

__all__ = [
    "QTensor", "quantize", "dequantize", "stochastic_round", "pack_nibbles",
    "unpack_nibbles", "nf4_quantize", "nf4_dequantize", "put", "get", "nbytes",
]

_FORMATS = ("asym", "sym", "nf4")


class QTensor(NamedTuple):
    """A quantized tensor: ``codes`` (uint8, packed two per byte when ``bits <= 4``),
    ``scale`` (float32, one per group; for double-quantized NF4 a nested 8-bit
    :class:`QTensor` of the absmax), ``offset`` (float32 per group, asymmetric only, else
    ``None``), and the metadata needed to dequantize."""

    codes: Tensor
    scale: Tensor
    offset: Optional[Tensor]
    shape: torch.Size
    bits: int
    group_size: int
    fmt: str  # "asym", "sym" or "nf4"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self, dtype)


def _check(bits: int, group_size: int, fmt: str) -> None:
    if fmt not in _FORMATS:
        raise ValueError(f"Invalid quantization format {fmt!r}: expected one of {_FORMATS}")
    check(is_int(bits) and 2 <= bits <= 8, "bits", bits, "an int from 2 to 8")
    if fmt == "nf4" and bits != 4:
        raise ValueError(f"Invalid bits for NF4: {bits!r} (NF4 is 4-bit)")
    check_int("group_size", group_size)


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """Flatten ``x`` to float32 groups of ``group_size`` (last group padded by repetition)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def stochastic_round(y: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Round to an integer, up with probability :math:`y - \lfloor y \rfloor`; unbiased."""
    return _stochastic_round_(y.clone(), generator)


def _stochastic_round_(y: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """:func:`stochastic_round` in place (same draws): one temporary of ``y``'s size."""
    return y.add_(torch.rand(y.shape, device=y.device, dtype=y.dtype,
                             generator=generator)).floor_()


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack a flat uint8 tensor of values < 16 two per byte: element 2i in the low
    nibble of byte i, element 2i+1 in the high nibble (odd lengths padded with 0)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` codes, as flat uint8."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


def quantize(x: Tensor, bits: int = 8, group_size: int = 256, symmetric: bool = False,
             stochastic: bool = False, generator: Optional[torch.Generator] = None,
             pack: bool = True) -> QTensor:
    """Quantize ``x`` group-wise to ``bits``-bit integer codes (see the module docstring).

    ``stochastic=True`` rounds stochastically (unbiased) instead of to nearest.
    ``pack=False`` keeps codes of ``bits <= 4`` one per byte (for layers that index
    them by position); :func:`dequantize` accepts both.
    """
    fmt = "sym" if symmetric else "asym"
    _check(bits, group_size, fmt)
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"quantize expects a real floating-point tensor, got {x.dtype}")
    g = _grouped(x, group_size)
    # one float32 temporary of x's size (y, rounded in place) plus the random draws
    rnd_ = (lambda y: _stochastic_round_(y, generator)) if stochastic else torch.round_
    if symmetric:
        half = 2 ** (bits - 1)
        scale = g.abs().amax(dim=1) / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = rnd_(g / scale[:, None]).clamp_(-(half - 1), half - 1)
        codes, offset = y.add_(half).to(torch.uint8), None
    else:
        qmax = 2 ** bits - 1
        lo = g.amin(dim=1)
        scale = (g.amax(dim=1) - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = (g - lo[:, None]).div_(scale[:, None])
        codes = rnd_(y).clamp_(0, qmax).to(torch.uint8)
        offset = lo
    del g, y
    codes = codes.reshape(-1)[: x.numel()]
    if bits <= 4 and pack:
        codes = pack_nibbles(codes)
    return QTensor(codes, scale, offset, x.shape, bits, group_size, fmt)


DQ_GROUP = 256  # NF4 blocks per group of the double-quantized absmax


def nf4_quantize(x: Tensor, blocksize: int = 64, double_quant: bool = False) -> QTensor:
    """NF4 (QLoRA's normal-float 4-bit code, absmax per block) via bitsandbytes; with
    ``double_quant`` the absmax is stored as 8-bit codes in groups of ``DQ_GROUP``."""
    import bitsandbytes.functional as bnbf

    _check(4, blocksize, "nf4")
    packed, qs = bnbf.quantize_4bit(x.detach().float().contiguous(), blocksize=blocksize,
                                    quant_type="nf4")
    absmax = qs.absmax.float()
    scale = quantize(absmax, 8, DQ_GROUP) if double_quant else absmax
    return QTensor(packed.reshape(-1), scale, None, x.shape, 4, blocksize, "nf4")


# QLoRA's NF4 code book (bitsandbytes.functional.get_4bit_type("nf4"); a test checks it)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
            0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def nf4_dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`nf4_quantize`: ``code[q] · absmax`` per block in float32, then
    cast. Plain torch ops on bitsandbytes' layout (the first code of a byte in its high
    nibble), so it runs on any device and traces under ``torch.compile``, and it equals
    ``bitsandbytes.functional.dequantize_4bit`` bit for bit (a test checks it). That op
    itself is not used: under ``torch.compile`` its registered fake kernel disagrees with
    its CPU kernel about the output's shape (inductor's ``assert_size_stride`` fails)."""
    absmax = q.scale.dequantize() if isinstance(q.scale, QTensor) else q.scale
    numel = math.prod(q.shape)
    codes = q.codes.reshape(-1)
    idx = torch.stack([codes >> 4, codes & 0x0F], dim=1).reshape(-1)[:numel].long()
    values = torch.tensor(NF4_CODE, device=codes.device)[idx]
    pad = (-numel) % q.group_size
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    out = values.view(-1, q.group_size) * absmax[:, None]
    return out.reshape(-1)[:numel].view(q.shape).to(dtype)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize` / :func:`nf4_quantize` up to the rounding error."""
    if q.fmt == "nf4":
        return nf4_dequantize(q, dtype)
    numel = math.prod(q.shape)
    packed = q.bits <= 4 and q.codes.numel() < numel
    codes = unpack_nibbles(q.codes, numel) if packed else q.codes.reshape(-1)
    pad = (-numel) % q.group_size
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    g = codes.view(-1, q.group_size).float()
    if q.offset is None:
        out = (g - 2 ** (q.bits - 1)) * q.scale[:, None]
    else:
        out = torch.addcmul(q.offset[:, None], g, q.scale[:, None])
    return out.reshape(-1)[:numel].view(q.shape).to(dtype)


def nbytes(q: QTensor) -> int:
    """Bytes held by the tensors of ``q`` (codes, scales, offsets; nested ones included)."""
    return sum(nbytes(t) if isinstance(t, QTensor) else t.numel() * t.element_size()
               for t in (q.codes, q.scale, q.offset) if t is not None)


def put(store: dict, name: str, q: QTensor) -> None:
    """Write ``q`` into a flat dict (optimizer state, module buffers) as ``<name>_codes``,
    ``<name>_scale`` (a double-quantized absmax: ``<name>_scale_codes``/``_scale``/
    ``_offset``) and, for asymmetric formats, ``<name>_offset``."""
    store[f"{name}_codes"] = q.codes
    if isinstance(q.scale, QTensor):
        put(store, f"{name}_scale", q.scale)
    else:
        store[f"{name}_scale"] = q.scale
    if q.offset is not None:
        store[f"{name}_offset"] = q.offset
    else:
        store.pop(f"{name}_offset", None)


def get(store: dict, name: str, shape, bits: int, group_size: int, fmt: str) -> QTensor:
    """Read back what :func:`put` wrote; shape and format come from the caller (a nested
    absmax is recognised by its ``<name>_scale_codes``)."""
    numel = math.prod(shape)
    if f"{name}_scale_codes" in store:
        scale = get(store, f"{name}_scale", (-(-numel // group_size),), 8, DQ_GROUP, "asym")
    else:
        scale = store[f"{name}_scale"]
    return QTensor(store[f"{name}_codes"], scale, store.get(f"{name}_offset"),
                   torch.Size(shape), bits, group_size, fmt)
