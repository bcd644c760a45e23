r"""Inner update rules as single-tensor functions.

Each rule takes a gradient-shaped tensor ``g`` (a full gradient, or its low-rank
projection), updates its moment tensors in place, and returns the *direction* ``d``
(a new float32 tensor) such that the parameter update is :math:`-\mathrm{lr}\cdot d`.
Rules know nothing of projection, learning rate or weight decay; the optimizer applies
those in full space.

* :func:`adam_` — Adam with bias correction. With ``hf_eps=False`` (torch):
  :math:`d = \hat m / (\sqrt{\hat v} + \epsilon)`; with ``hf_eps=True`` (the GaLore
  reference, from HF transformers' AdamW): :math:`d = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
  \cdot m / (\sqrt{v} + \epsilon)`, i.e. :math:`\epsilon` enters before bias correction.
  For contiguous float32 CPU tensors either form is one call of torch's fused Adam
  kernel instead of seven elementwise passes (same values up to float32 rounding;
  ``benchmarks/bench_step.py`` measures the step).
* :func:`adam8bit_` — the same Adam with both moments stored as 8-bit blockwise
  dynamic codes (blocks of 256, one float32 absmax per block), through
  ``bitsandbytes.functional.optimizer_update_8bit_blockwise`` (CPU and GPU).
* :func:`adafactor_` — Adafactor (Shazeer & Stern, 2018) with a factored second
  moment for matrices (row and column means of :math:`g^2 + \epsilon_1`),
  :math:`\hat\beta_{2,t} = 1 - t^{-0.8}`, RMS clipping at ``clip_threshold`` and an
  optional first moment (``beta1``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["adam_", "adamw_fused_", "adam8bit_", "adafactor_", "add_", "init_adam8bit", "BLOCK_8BIT"]

BLOCK_8BIT = 256


def adam_(g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float,
          beta2: float, eps: float, hf_eps: bool = False) -> Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` with ``g`` (step ``step`` >= 1); return the direction."""
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    if _fusable(g, exp_avg, exp_avg_sq):
        # one pass of torch's fused Adam kernel instead of seven elementwise ones: its
        # parameter update, p -= lr * m̂ / (sqrt(v̂) + eps), with p = 0 and lr = -1, leaves
        # the direction in p. HF's eps placement is torch's with eps / sqrt(bc2):
        #   sqrt(bc2)/bc1 * m / (sqrt(v) + eps) = m̂ / (sqrt(v̂) + eps / sqrt(bc2))
        d = torch.zeros_like(exp_avg)
        torch._fused_adam_([d], [g], [exp_avg], [exp_avg_sq], [], [_step_tensor(step)],
                           lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=eps / math.sqrt(bc2) if hf_eps else eps, amsgrad=False,
                           maximize=False)
        return d
    g = g.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if hf_eps:
        return (exp_avg / (exp_avg_sq.sqrt() + eps)).mul_(math.sqrt(bc2) / bc1).float()
    if exp_avg.dtype == torch.float32 or not (exp_avg.is_contiguous()
                                             and exp_avg_sq.is_contiguous()):
        # the quotient in float32, as torch's addcdiv computes it for low-precision
        # moments, written over the denominator: one full-size temporary (the direction)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps).float()
        return torch.div(exp_avg.float(), denom, out=denom).div_(bc1)
    # low-precision moments: the same in slices (float32 copies of whole moments would add
    # 8 bytes per element)
    d = torch.empty(exp_avg.shape, dtype=torch.float32, device=exp_avg.device)
    for m, v, out in zip(*(_slices(t) for t in (exp_avg, exp_avg_sq, d))):
        denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps).float()
        torch.div(m.float(), denom, out=out).div_(bc1)
    return d


def adamw_fused_(w: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> bool:
    """AdamW's whole step on ``w`` (torch's update and decoupled weight decay) in one call
    of torch's fused kernel, when it takes these tensors (:func:`_fusable`) and ``lr`` is a
    number; returns whether it ran. Equals :func:`adam_` followed by ``w·(1 − lr·wd) −
    lr·d`` up to float32 rounding, without the direction's full-size buffer and the
    separate write (``docs/decisions.md``, Fused plain Adam)."""
    if not (_fusable(w, g, exp_avg, exp_avg_sq) and isinstance(lr, (int, float))):
        return False
    torch._fused_adamw_([w], [g], [exp_avg], [exp_avg_sq], [], [_step_tensor(step)],
                        lr=float(lr), beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                        eps=eps, amsgrad=False, maximize=False)
    return True


def add_(target: Tensor, update: Tensor, alpha: float) -> Tensor:
    """``target += alpha * update`` in place. A low-precision ``target`` with a float32
    ``update`` is added in slices: for a mixed-dtype in-place add torch materializes float32
    copies of the whole target (8 bytes per element measured on CPU); the slices give the
    same values (one rounding per element) with temporaries of one slice."""
    if target.dtype == update.dtype or not target.is_contiguous():
        return target.add_(update, alpha=alpha)
    for t, u in zip(_slices(target), _slices(update.contiguous())):
        t.add_(u, alpha=alpha)
    return target


def _slices(t: Tensor) -> tuple:
    """Flat views of ``t`` (contiguous) in pieces of ``_CHUNK`` elements."""
    return t.view(-1).split(_CHUNK)


def _fusable(*ts: Tensor) -> bool:
    """Whether torch's fused Adam kernel takes these tensors: contiguous float32 on the CPU
    (its CPU kernel walks raw memory, so a strided view would be read wrongly; the CPU is
    where this path is measured and tested, elsewhere the elementwise path runs)."""
    return _HAS_FUSED and all(t.dtype is torch.float32 and t.device.type == "cpu"
                              and t.is_contiguous() for t in ts)


_HAS_FUSED = hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_")
_STEP = (0, None)  # the last step number and its float tensor (the kernel only reads it)


def _step_tensor(step: int) -> Tensor:
    global _STEP
    last = _STEP  # one read of an immutable pair: safe if another thread replaces it
    if last[0] != step:
        _STEP = last = (step, torch.tensor(float(step)))
    return last[1]


_QMAPS: dict = {}


def _qmaps(device: torch.device) -> tuple[Tensor, Tensor]:
    if device not in _QMAPS:
        import bitsandbytes.functional as bnbf

        _QMAPS[device] = (bnbf.create_dynamic_map(signed=True).to(device),
                          bnbf.create_dynamic_map(signed=False).to(device))
    return _QMAPS[device]


def init_adam8bit(state: dict, like: Tensor) -> None:
    """Zero 8-bit moments for a tensor shaped like ``like``: ``exp_avg_codes``,
    ``exp_avg_sq_codes`` (uint8) and ``exp_avg_absmax``, ``exp_avg_sq_absmax`` (float32)."""
    n, dev = like.numel(), like.device
    blocks = -(-n // BLOCK_8BIT)
    for name in ("exp_avg", "exp_avg_sq"):
        state[f"{name}_codes"] = torch.zeros(like.shape, dtype=torch.uint8, device=dev)
        state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=dev)


def adam8bit_(g: Tensor, state: dict, step: int, beta1: float, beta2: float,
              eps: float) -> Tensor:
    """8-bit Adam on the moments :func:`init_adam8bit` created; returns the direction."""
    import bitsandbytes.functional as bnbf

    q1, q2 = _qmaps(g.device)
    out = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
    flat_g, flat_out = g.reshape(-1), out.view(-1)
    c1, c2 = state["exp_avg_codes"].view(-1), state["exp_avg_sq_codes"].view(-1)
    a1, a2 = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
    # in slices of whole 256-element blocks: bitsandbytes' CPU kernel makes float32 copies
    # of everything it is given (24-30 bytes per element measured on a 7B embedding)
    for s in range(0, flat_g.numel(), _CHUNK):
        e = min(s + _CHUNK, flat_g.numel())
        bnbf.optimizer_update_8bit_blockwise(
            "adam", flat_g[s:e].float().contiguous(), flat_out[s:e], c1[s:e], c2[s:e],
            beta1, beta2, 0.0, 0.0, eps, step, 1.0, q1, q2,
            a1[s // 256:-(-e // 256)], a2[s // 256:-(-e // 256)])
    return out.neg_()


# elements per slice: per bitsandbytes call (a multiple of its 256-element blocks; the CPU
# transient is ~30 bytes per element of one slice; 2^20 also ran faster than 2^22 or 2^18:
# 16M-element embedding, one thread: 0.73 / 1.02 / 0.86 s per update), and per piece of a
# low-precision tensor's float32 arithmetic (adam_, add_)
_CHUNK = 1 << 20


def dequantize_adam8bit(state: dict, name: str) -> Tensor:
    """Float32 value of an 8-bit moment (``name`` is ``exp_avg`` or ``exp_avg_sq``)."""
    import bitsandbytes.functional as bnbf

    codes = state[f"{name}_codes"]
    q1, q2 = _qmaps(codes.device)
    qs = bnbf.QuantState(absmax=state[f"{name}_absmax"], code=q1 if name == "exp_avg" else q2,
                         blocksize=BLOCK_8BIT, dtype=torch.float32, shape=codes.shape)
    return bnbf.dequantize_blockwise(codes, qs)


def quantize_adam8bit(state: dict, name: str, value: Tensor) -> None:
    """Store a float moment back as 8-bit codes (inverse of :func:`dequantize_adam8bit`)."""
    import bitsandbytes.functional as bnbf

    q1, q2 = _qmaps(value.device)
    codes, qs = bnbf.quantize_blockwise(value.float().contiguous(),
                                        code=q1 if name == "exp_avg" else q2,
                                        blocksize=BLOCK_8BIT)
    state[f"{name}_codes"], state[f"{name}_absmax"] = codes, qs.absmax


def adafactor_(g: Tensor, state: dict, step: int, beta1: Optional[float],
               eps1: float = 1e-30, clip_threshold: float = 1.0,
               decay_rate: float = -0.8, shard=None) -> Tensor:
    """Adafactor on ``state`` (``exp_avg_sq_row``/``_col`` for matrices, ``exp_avg_sq``
    otherwise, ``exp_avg`` when ``beta1`` is set); returns the direction.

    ``shard`` (a :class:`lowrank_optim.fsdp.Shards`: ``dim``, ``size``, ``all_reduce_``):
    ``g`` and the state are this rank's slices of tensors split on ``dim``, of ``size``
    elements there; the means over the whole tensor (the factor split across ranks,
    the row factor's mean, the update's RMS) then cost two small all-reduces."""
    g = g.float()
    beta2t = 1.0 - step ** decay_rate
    sq = g.square().add_(eps1)
    if g.dim() == 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        if shard is None:
            row.lerp_(sq.mean(dim=1), 1 - beta2t)
            col.lerp_(sq.mean(dim=0), 1 - beta2t)
            row_mean = row.mean()
        else:
            row_mean = _sharded_factors_(sq, row, col, 1 - beta2t, shard)
        r = (row / row_mean).rsqrt_()
        d = g * r[:, None] * col.rsqrt()[None, :]
    else:
        v = state["exp_avg_sq"]
        v.lerp_(sq, 1 - beta2t)
        d = g * v.rsqrt()
    if shard is None:
        rms = d.norm() / math.sqrt(d.numel())
    else:
        numel = shard.size * math.prod(s for i, s in enumerate(d.shape) if i != shard.dim)
        rms = shard.all_reduce_(d.square().sum()).sqrt_() / math.sqrt(numel)
    d.div_((rms / clip_threshold).clamp_(min=1.0))
    if beta1 is not None:
        m = state["exp_avg"]
        m.lerp_(d, 1 - beta1)
        d = m.clone()
    return d


def _sharded_factors_(sq: Tensor, row: Tensor, col: Tensor, weight: float, shard) -> Tensor:
    """:func:`adafactor_`'s factor updates on a slice ``sq`` split on ``shard.dim`` (the
    factor along that dimension is split too, the other one replicated); returns the
    row factor's mean over the whole matrix. One all-reduce."""
    m, n = sq.shape
    if shard.dim == 0:  # rows split: the column sums and the row factor's sum are reduced
        m = shard.size
        row.lerp_(sq.sum(dim=1).div_(n), weight)
        both = shard.all_reduce_(torch.cat([sq.sum(dim=0), row.sum().reshape(1)]))
        col.lerp_(both[:-1].div_(m), weight)
        return both[-1] / m
    n = shard.size  # columns split: the row sums are reduced
    row.lerp_(shard.all_reduce_(sq.sum(dim=1)).div_(n), weight)
    col.lerp_(sq.sum(dim=0).div_(m), weight)
    return row.mean()


def init_adafactor(state: dict, like: Tensor, beta1: Optional[float]) -> None:
    """Float32 zero moments for :func:`adafactor_` on a tensor shaped like ``like``."""
    z = dict(dtype=torch.float32, device=like.device)
    if like.dim() == 2:
        state["exp_avg_sq_row"] = torch.zeros(like.shape[0], **z)
        state["exp_avg_sq_col"] = torch.zeros(like.shape[1], **z)
    else:
        state["exp_avg_sq"] = torch.zeros(like.shape, **z)
    if beta1 is not None:
        state["exp_avg"] = torch.zeros(like.shape, **z)
