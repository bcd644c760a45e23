r"""LR-QAT: low-rank quantization-aware training (Bondarenko et al., 2024, arXiv:2406.06385).

Each target ``nn.Linear`` becomes an :class:`LRQATLinear` whose weight is

.. math::
    \hat W = s \cdot \mathrm{clamp}\big(\lfloor \Phi_0 + \tfrac{\alpha}{r} A B \rceil,\
             -2^{b-1},\ 2^{b-1}-1\big), \qquad \Phi_0 = \varphi(W_0 / s_0)

Glossary: :math:`b` = ``bits``; :math:`r` = ``rank``; :math:`\alpha` = ``alpha``;
:math:`A` (out × r, zero init) and :math:`B` (r × in, Kaiming-uniform) the trainable
adapters, which live *inside* the integer grid; :math:`s` (out × groups, float32) the
learnable scales, one per output row (``group_size=None``) or per ``group_size``
consecutive inputs of a row; :math:`s_0` their initial value, chosen per group by a grid
search over 81 clipping ratios (1.0 down to 0.2 of the group's absmax) minimising
:math:`\|W_0 - Q(W_0)\|_2`; :math:`\lfloor\cdot\rceil` round-half-to-even with a
straight-through gradient.

:math:`\Phi_0` is a frozen buffer (the float weight is gone after :func:`prepare_lr_qat`):

* ``storage="int8"`` (default): fixed point with :math:`F = 8-b` fractional bits (Q4.4 at
  4 bits, Q3.5 at 3): :math:`\Phi_0 = 2^F n + f` with :math:`n = \lfloor x\rceil` the
  round-to-nearest code of :math:`x = \mathrm{clamp}(W_0/s_0)` and
  :math:`f = \lfloor 2^F(x-n)\rceil` clipped to :math:`|f| \le 2^{F-1}-1`. The reference
  rounds :math:`2^F x` directly, which turns values within :math:`2^{-F-1}` of a rounding
  boundary into exact ties; keeping the offset strictly inside half a step makes the
  forward at init (:math:`A = 0`) *equal* round-to-nearest quantization of :math:`W_0`
  with scales :math:`s_0`, and keeps every other value's fraction to :math:`2^{-F}`, so
  the adapter can move weights across rounding boundaries.
* ``storage="int4x2"`` (``bits <= 4``): only the integer codes :math:`n`, two per byte
  (:func:`lowrank_optim.quant.pack_nibbles`); the fraction is lost and the adapter has to
  learn it back (the paper's "φ = INT4" variant, absent from the reference code).

Gradients (straight-through rounding; the clamp masks values outside the grid):
:math:`\partial L/\partial Z = s\,\partial L/\partial\hat W \odot 1[\lfloor Z\rceil \in
\text{grid}]`, :math:`\partial L/\partial A = \tfrac{\alpha}{r}\,(\partial L/\partial Z)
B^\top`, :math:`\partial L/\partial B = \tfrac{\alpha}{r} A^\top \partial L/\partial Z`,
:math:`\partial L/\partial s = \sum_{\text{group}} \partial L/\partial \hat W \odot
\mathrm{clamp}(\lfloor Z\rceil)`. The last is LSQ's scale gradient without its
:math:`-x/s` term, which vanishes because :math:`\Phi_0` does not depend on :math:`s`
(the reference's choice); LSQ's gradient scaling is not applied: under Adam it would
change nothing, and the separate, small scale learning rate plays its role.

Memory: the layer's autograd function saves only its input, :math:`A`, :math:`B`,
:math:`s` and :math:`\Phi_0` (already held). :math:`Z` and :math:`\hat W` are built in
float32 in forward, used and dropped, and rebuilt in backward, so training holds at most
one layer's dense weight at a time. :math:`Z` is always float32 (adapters in bf16 are
upcast), in training and in :func:`export_lr_qat`, so the exported integer model computes
exactly the trained model's forward.

Dtypes: ``model.to(torch.bfloat16)`` casts :math:`A`, :math:`B` and the bias (the
reference trains bf16 adapters) but keeps the scales float32: a step of ``scale_lr =
1e-5`` is far below bf16's resolution. Only symmetric grids are implemented (the paper
uses asymmetric ones at 2 bits).
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import quant
from ._checks import is_int as _is_int
from ._layers import Float32Tensors, swap_linears

__all__ = ["LRQATLinear", "IntLinear", "prepare_lr_qat", "lr_qat_param_groups",
           "export_lr_qat", "init_scale", "downcast"]

STORAGES = ("int8", "int4x2")
CLIP_RATIOS = torch.linspace(1.0, 0.2, 81)


def _grid(bits: int) -> tuple[int, int]:
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def _check_args(in_features: int, out_features: int, bits: int, rank: int = 1,
               alpha: float = 1.0, group_size: Optional[int] = None,
               storage: str = "int8") -> None:
    """Raise ``ValueError`` naming the first bad argument and what is allowed."""
    if not _is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"Invalid bits: {bits!r} (expected an int from 2 to 8)")
    most = min(in_features, out_features)
    if not _is_int(rank) or not 1 <= rank <= most:
        raise ValueError(f"Invalid rank: {rank!r} (expected an int from 1 to min(in_features, "
                         f"out_features) = {most})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid alpha: {alpha!r} (expected a finite number > 0)")
    if group_size is not None and not (_is_int(group_size) and group_size > 0
                                       and in_features % group_size == 0):
        raise ValueError(f"Invalid group_size: {group_size!r} (expected None for one scale "
                         f"per output channel, or a positive int dividing in_features = "
                         f"{in_features})")
    if storage not in STORAGES:
        raise ValueError(f"Invalid storage: {storage!r} (expected one of {STORAGES})")
    if storage == "int4x2" and bits > 4:
        raise ValueError(f"Invalid storage 'int4x2' for bits={bits}: two codes per byte "
                         f"hold at most 4 bits; use storage='int8'")


class _Spec(NamedTuple):
    """What the autograd function needs besides tensors (static per layer)."""

    out_features: int
    in_features: int
    bits: int
    group: int       # inputs per scale (in_features when per-channel)
    frac_bits: int   # fractional bits of the int8 fixed-point Phi_0
    packed: bool     # Phi_0 as two integer codes per byte
    c: float         # alpha / rank

    def grouped(self, t: Tensor) -> Tensor:
        return t.view(self.out_features, -1, self.group)


def _unpack(codes: Tensor, bits: int, out_features: int, in_features: int) -> Tensor:
    """Packed unsigned nibble codes -> float32 signed integers, shape (out, in)."""
    numel = out_features * in_features
    n = quant.unpack_nibbles(codes.reshape(-1), numel).view(out_features, in_features)
    return n.float() - 2 ** (bits - 1)


def _encode(n: Tensor, bits: int) -> Tensor:
    """Signed integer grid values (float) -> uint8 codes ``n + 2^(b-1)``, packed two per
    byte when ``bits <= 4``."""
    codes = (n + 2 ** (bits - 1)).to(torch.uint8)
    return quant.pack_nibbles(codes) if bits <= 4 else codes


def _rounded_z(phi0: Tensor, A: Tensor, B: Tensor, spec: _Spec) -> Tensor:
    """round(Phi_0 + (alpha/r) A B) in float32, not clamped."""
    if spec.packed:
        base = _unpack(phi0, spec.bits, spec.out_features, spec.in_features)
    else:
        base = phi0.float().mul_(2.0 ** -spec.frac_bits)  # exact
    return torch.addmm(base, A.float(), B.float(), alpha=spec.c).round_()


def _dequant(n: Tensor, scale: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """s * n per group of ``group`` inputs, in float32, then cast: the one formula that
    training and export share."""
    return (n.view(n.shape[0], -1, group) * scale[..., None]).view(n.shape).to(dtype)


class _LRQATFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scale, bias, phi0, spec):
        n = _rounded_z(phi0, A, B, spec).clamp_(*_grid(spec.bits))
        w = _dequant(n, scale, spec.group, x.dtype)
        del n
        ctx.spec, ctx.bias_dtype = spec, None if bias is None else bias.dtype
        ctx.save_for_backward(x, A, B, scale, phi0)
        return F.linear(x, w, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, A, B, scale, phi0 = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_a, need_b, need_s, need_bias = ctx.needs_input_grad[:5]
        lo, hi = _grid(spec.bits)
        n = _rounded_z(phi0, A, B, spec)
        inside = (n >= lo) & (n <= hi)
        n.clamp_(lo, hi)
        grad_x = grad_a = grad_b = grad_s = grad_bias = None
        if need_x:
            grad_x = grad_out @ _dequant(n, scale, spec.group, grad_out.dtype)
        g2 = grad_out.reshape(-1, spec.out_features)
        if need_a or need_b or need_s:
            gw = g2.float().T @ x.reshape(-1, spec.in_features).float()  # dL/dW_hat
            if need_s:
                grad_s = (spec.grouped(gw) * spec.grouped(n)).sum(-1)
            del n
            if need_a or need_b:
                gz = spec.grouped(gw).mul_(scale[..., None]).view(gw.shape).mul_(inside)
                if need_a:
                    grad_a = (gz @ B.float().T).mul_(spec.c).to(A.dtype)
                if need_b:
                    grad_b = (A.float().T @ gz).mul_(spec.c).to(B.dtype)
        if need_bias:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_s, grad_bias, None, None


def _grouped_weight(w: Tensor, group_size: Optional[int]) -> Tensor:
    out_features, in_features = w.shape
    return w.detach().float().view(out_features, -1, group_size or in_features)


@torch.no_grad()
def init_scale(w: Tensor, bits: int, group_size: Optional[int] = None) -> Tensor:
    """Symmetric scales, shape (out, in // group_size) (one column when ``group_size`` is
    None), minimising each group's squared round-to-nearest error over the clipping
    ratios ``CLIP_RATIOS`` (scale = ratio · absmax / (2^(b-1) - 1)). An all-zero group
    gets scale 1."""
    lo, hi = _grid(bits)
    g = _grouped_weight(w, group_size)
    amax = g.abs().amax(-1)
    best, best_err = torch.ones_like(amax), torch.full_like(amax, math.inf)
    for ratio in CLIP_RATIOS.tolist():
        s = (amax * (ratio / hi)).clamp_min_(torch.finfo(torch.float32).tiny)
        err = (torch.round(g / s[..., None]).clamp_(lo, hi) * s[..., None] - g).square_().sum(-1)
        better = (err < best_err) & (amax > 0)
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def downcast(w: Tensor, scale: Tensor, bits: int, group_size: Optional[int] = None,
             storage: str = "int8") -> Tensor:
    r""":math:`\Phi_0 = \varphi(W_0/s_0)` as stored by :class:`LRQATLinear` (module docstring):
    int8 fixed point of shape ``w.shape``, or flat packed uint8 codes for ``"int4x2"``."""
    lo, hi = _grid(bits)
    x = (_grouped_weight(w, group_size) / scale[..., None]).clamp_(lo, hi).view(w.shape)
    n = torch.round(x)
    if storage == "int4x2":
        return _encode(n, bits)
    fb = 8 - bits
    lim = max(2 ** (fb - 1) - 1, 0)
    f = torch.round((x - n) * 2 ** fb).clamp_(-lim, lim)
    return (n * 2 ** fb + f).to(torch.int8)


class LRQATLinear(Float32Tensors):
    """A Linear layer trained by LR-QAT (see the module docstring).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits (int): weight bits, 2 to 8. Default 4.
        rank (int): adapter rank, 1 to min(in_features, out_features). Default 32.
        alpha (float): adapter scaling, applied as ``alpha / rank``. Default 1.
        group_size (int or None): inputs per scale; ``None`` = one scale per output
            channel. Must divide ``in_features``.
        storage (str): ``"int8"`` (fixed point, keeps 8 - bits fractional bits) or
            ``"int4x2"`` (integer codes, two per byte; ``bits <= 4``).

    Parameters ``A`` (out × rank, zeros), ``B`` (rank × in), ``scale`` (out × groups,
    float32) and ``bias``; buffer ``phi0``. Build from a trained layer with
    :meth:`from_linear` (the constructor leaves ``phi0`` zero and ``scale`` one, the
    shape a ``load_state_dict`` fills).
    """

    FLOAT32 = ("scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 rank: int = 32, alpha: float = 1.0, group_size: Optional[int] = None,
                 storage: str = "int8", device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        _check_args(in_features, out_features, bits, rank, alpha, group_size, storage)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.rank, self.alpha = bits, rank, alpha
        self.group_size, self.storage = group_size, storage
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        groups = 1 if group_size is None else in_features // group_size
        self.scale = nn.Parameter(torch.ones(out_features, groups, device=device))
        numel = in_features * out_features
        self.register_buffer("phi0", torch.zeros((numel + 1) // 2, dtype=torch.uint8,
                                                 device=device) if storage == "int4x2"
                             else torch.zeros(out_features, in_features, dtype=torch.int8,
                                              device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, rank: int = 32, alpha: float = 1.0,
                    group_size: Optional[int] = None, storage: str = "int8") -> "LRQATLinear":
        """Quantize ``linear``'s weight (range search, downcast); copy its bias, keeping
        the bias's ``requires_grad``."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits,
                    rank, alpha, group_size, storage, device=w.device, dtype=w.dtype)
        s0 = init_scale(w, bits, group_size)
        with torch.no_grad():
            layer.scale.copy_(s0)
            layer.phi0.copy_(downcast(w, s0, bits, group_size, storage))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
                layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    @property
    def spec(self) -> _Spec:
        return _Spec(self.out_features, self.in_features, self.bits,
                     self.group_size or self.in_features, 8 - self.bits,
                     self.storage == "int4x2", self.alpha / self.rank)

    @torch.no_grad()
    def int_weight(self) -> Tensor:
        """clamp(round(Phi_0 + (alpha/r) A B)): the integer weight, float32 (out, in)."""
        return _rounded_z(self.phi0, self.A, self.B, self.spec).clamp_(*_grid(self.bits))

    @torch.no_grad()
    def quantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the forward uses, ``s * int_weight()``, without autograd."""
        return _dequant(self.int_weight(), self.scale, self.spec.group, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _LRQATFn.apply(x, self.A, self.B, self.scale, self.bias, self.phi0, self.spec)

    @torch.no_grad()
    def to_int_linear(self) -> "IntLinear":
        """The :class:`IntLinear` computing exactly this layer's forward."""
        layer = IntLinear(self.in_features, self.out_features, self.bias is not None,
                          self.bits, self.group_size, device=self.A.device,
                          dtype=self.A.dtype if self.bias is None else self.bias.dtype)
        layer.codes.copy_(_encode(self.int_weight(), self.bits).view(layer.codes.shape))
        layer.scale.copy_(self.scale)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
            layer.bias.requires_grad_(self.bias.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, rank={self.rank}, "
                f"alpha={self.alpha}, group_size={self.group_size}, storage={self.storage!r}")


class IntLinear(Float32Tensors):
    """A Linear layer with a frozen integer weight: buffers ``codes`` (uint8, the signed
    value plus 2^(bits-1); two per byte, low nibble first, when ``bits <= 4``) and
    ``scale`` (float32, out × groups), and an optional float ``bias``. Its forward is
    ``F.linear(x, s * codes, bias)``; :func:`export_lr_qat` produces it."""

    FLOAT32 = ("scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: Optional[int] = None, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        _check_args(in_features, out_features, bits, group_size=group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        numel = in_features * out_features
        self.register_buffer("codes", torch.zeros((numel + 1) // 2, dtype=torch.uint8,
                                                  device=device) if bits <= 4 else
                             torch.zeros(out_features, in_features, dtype=torch.uint8,
                                         device=device))
        groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("scale", torch.ones(out_features, groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) \
            if bias else None

    def int_weight(self) -> Tensor:
        """The signed integer weight, float32 (out, in)."""
        if self.bits <= 4:
            return _unpack(self.codes, self.bits, self.out_features, self.in_features)
        return self.codes.float() - 2 ** (self.bits - 1)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return _dequant(self.int_weight(), self.scale, self.group_size or self.in_features,
                        dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}")


def prepare_lr_qat(model: nn.Module, bits: int = 4, rank: int = 32, alpha: float = 1.0,
                   group_size: Optional[int] = None,
                   target_modules: Optional[Iterable[str]] = ("attn", "mlp"),
                   storage: str = "int8") -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` (every Linear when ``None``) by an :class:`LRQATLinear`; returns
    ``model``. Raises ``ValueError`` when nothing matches.

    Each layer's float weight is quantized now (range search, then downcast to
    ``phi0``) and dropped: it is frozen by construction, a buffer, not a parameter.
    Biases keep their ``requires_grad``, and every other parameter (embeddings, norms,
    output head) is left as it is. The paper trains only the adapters and scales: call
    ``model.requires_grad_(False)`` *before* this function for that, or pass only the
    first two groups of :func:`lr_qat_param_groups` to the optimizer.

    Every matching layer is checked before any is replaced: a bad argument raises
    ``ValueError`` naming the layer's shape and leaves the model unchanged.
    """
    def check(linear: nn.Linear) -> nn.Linear:
        try:
            _check_args(linear.in_features, linear.out_features, bits, rank, alpha,
                       group_size, storage)
        except ValueError as e:
            raise ValueError(f"Linear({linear.in_features} -> {linear.out_features}): "
                             f"{e}") from None
        return linear

    swap_linears(model, target_modules, check)  # each layer "replaced" by itself
    return swap_linears(model, target_modules, lambda linear: LRQATLinear.from_linear(
        linear, bits, rank, alpha, group_size, storage))


def _layers(model: nn.Module) -> list[tuple[str, "LRQATLinear"]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LRQATLinear)]
    if not found:
        raise ValueError("The model has no LRQATLinear layer; call prepare_lr_qat(model) first")
    return found


def lr_qat_param_groups(model: nn.Module, lr: float = 1e-3, scale_lr: float = 1e-5,
                        weight_decay: float = 0.0) -> list[dict]:
    """Param groups for any ``torch.optim`` optimizer: the adapters ``A``, ``B`` (``lr``,
    ``weight_decay``), the scales (``scale_lr``, weight decay 0), then every other
    parameter that requires grad (``lr``, ``weight_decay``). Empty groups are left out.
    Each group sets ``rank: None``, so this package's optimizers step them as plain
    AdamW (the adapters are low-rank already); other optimizers ignore the key."""
    adapters, scales = [], []
    for _, m in _layers(model):
        adapters += [m.A, m.B]
        scales.append(m.scale)
    taken = {id(p) for p in adapters + scales}
    rest = [p for p in model.parameters() if id(p) not in taken]
    groups = [(adapters, lr, weight_decay), (scales, scale_lr, 0.0), (rest, lr, weight_decay)]
    return [{"params": ps, "lr": g_lr, "weight_decay": wd, "rank": None}
            for params, g_lr, wd in groups
            if (ps := [p for p in params if p.requires_grad])]


@torch.no_grad()
def export_lr_qat(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`LRQATLinear` by its :class:`IntLinear` (integer
    codes, packed two per byte when ``bits <= 4``, and the trained scales; no adapter
    left) and return ``model``. Its outputs equal the trained model's exactly. Call
    ``copy.deepcopy(model)`` first to keep training."""
    for name, layer in _layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                layer.to_int_linear())
    return model
