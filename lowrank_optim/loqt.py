"""LoQT: low-rank adapters for quantized training (Loeschcke et al., NeurIPS 2024)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import rules
from ._base import STATE_POLICIES, LowRankOptimizer, _check
from .refresh import Exponential

__all__ = ["LoQTAdamW", "LoQTAdamW8bit"]


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
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, v,
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
                warnings.warn(f"{type(self).__name__}: the merge due at step {state['step']} "
                              "waits for the next backward pass (no gradient was captured: "
                              "run backward after creating the optimizer)", stacklevel=3)
        super().step_param(p, group)
        self._set_capture(p, layer, group, state, state["step"])

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
made) waits for the next backward pass, with a warning.

Moments of :math:`B` at a merge (``state_on_merge``): ``"keep"`` (the reference: reused
as they are), ``"project"`` (rotated into the new basis with :math:`P_{old}^\top
P_{new}`, as :class:`GaLoreAdamW`'s ``state_on_refresh="project"``) or ``"reset"``
(zeroed, bias correction restarted; the default, by measurement with the current storage
and staggered merges: main job, 3 seeds, validation perplexity 3.854 against 3.899 for
project, lower on every seed, ``benchmarks/results/loqt_quant.md``; tiny LLaMA, 400
steps, merges from gap 50, 2 seeds, ``benchmarks/results/state_on_merge.md``: project
+0.5%, keep +2.7% over reset. With NF4 blocks of 64, an INT4 ``P`` and unstaggered merges
project had been best, reset +3.1%).

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
        schedule. Default True, by measurement: on the main job (tiny LLaMA, 500 steps,
        3 seeds, ``benchmarks/results/loqt_stagger.md``) validation perplexity 3.932 vs
        3.976, lower on every seed.

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
