"""Inner rules as objects (lowrank_optim.rules) and the base's put-back step.

Each rule declares the shapes of the state it creates, validates its own
hyperparameters with an error naming the value, and moves its moments along a basis
change; a method that assembles its update differently overrides ``_put_back_`` only.
"""
from __future__ import annotations

import re

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim import rules

pytestmark = pytest.mark.usefixtures("single_thread")

GROUPS = {
    rules.Adam: dict(betas=(0.9, 0.999), eps=1e-8),
    rules.Adam8bit: dict(betas=(0.9, 0.999), eps=1e-8, min_8bit_size=64),
    rules.Adafactor: dict(beta1=0.9, eps=1e-30, clip_threshold=1.0),
}


@pytest.mark.parametrize("cls", list(GROUPS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [(7,), (16, 12), (3, 200)], ids=str)
def test_state_has_the_declared_shapes_and_updates_give_a_float32_direction(cls, shape):
    rule, group = cls(), GROUPS[cls]
    state = {}
    g = torch.randn(shape)
    rule.init(state, g, group)
    for key, s in rule.shapes(shape, group).items():
        if key in state:
            assert tuple(state[key].shape) == tuple(s), key
    declared = rule.shapes(shape, group)
    assert all(k in declared for k, v in state.items()
               if isinstance(v, torch.Tensor) and v.shape == g.shape)
    d = rule.update(state, g, 1, group, low_rank=True)
    assert d.shape == g.shape and d.dtype == torch.float32 and torch.isfinite(d).all()


@pytest.mark.parametrize("cls", list(GROUPS), ids=lambda c: c.__name__)
def test_transport_with_identity_keeps_the_moments(cls):
    rule, group = cls(), GROUPS[cls]
    state = {}
    g = torch.randn(16, 12)
    rule.init(state, g, group)
    rule.update(state, g, 1, group, low_rank=True)
    before = {k: v.clone() for k, v in state.items()}
    seen = []
    rule.transport_(state, lambda v, squared: (seen.append(squared), v)[1])
    assert seen and seen[0] is False and all(seen[1:])
    for k, v in before.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("cls, key, value", [
    (lo.GaLoreAdamW8bit, "min_8bit_size", -1), (lo.GaLoreAdafactor, "beta1", 1.5),
    (lo.GaLoreAdafactor, "clip_threshold", 0.0), (lo.GaLoreAdamW, "betas", (0.9,)),
    (lo.GaLoreAdamW8bit, "beta parameter at index 1", 1.0)])
def test_rule_hyperparameters_are_validated_per_group(cls, key, value):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=re.escape(f"{key}: {value!r}")):
        cls([{"params": [w], "betas" if key.startswith("beta ") else key:
              (0.9, value) if key.startswith("beta ") else value}], rank=2)


def test_put_back_is_the_one_step_a_method_overrides():
    """A Fira-like method: the GaLore update plus a scaled residual of the full gradient,
    written by overriding _put_back_ (with needs_full_grad), nothing else."""

    class Residual(lo.GaLoreAdamW):
        needs_full_grad = True

        def _put_back_(self, w, d, group, state, proj, g, low=None):
            super()._put_back_(w, d, group, state, proj, g, low)
            if proj is not None:  # low: the projected gradient the rule was given
                torch.testing.assert_close(low, proj.project(state, g), rtol=0, atol=0)
                back = torch.zeros_like(w)
                proj.add_back_(state, back, low, alpha=1.0)
                w.add_(g - back, alpha=-group["lr"])

    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(12, 8))
    w2 = torch.nn.Parameter(w1.detach().clone())
    o1, o2 = lo.GaLoreAdamW([w1], lr=0.1, rank=2), Residual([w2], lr=0.1, rank=2)
    g = torch.randn(12, 8)
    w1.grad, w2.grad = g.clone(), g.clone()
    o1.step()
    o2.step()
    basis = o1.basis(w1)  # right basis (m >= n): the residual is g (I - B Bᵀ)
    residual = g - g @ basis @ basis.T
    torch.testing.assert_close(w2.detach(), w1.detach() - 0.1 * residual)


# ---- any torch optimizer as the rule (rules.TorchRule, lo.GaLore) ----------------------

import torch_optimizer  # noqa: E402


def _run_pair(ours, ref, params, n=4, lrs=(1e-2, 5e-3, 2e-2, 1e-2)):
    """The same gradients (and lr changes, as a scheduler makes them) into both."""
    gen = torch.Generator().manual_seed(0)
    for t in range(n):
        g = [torch.randn(p.shape, generator=gen) for p in params[0]]
        for opt, ps in zip((ours, ref), params):
            for group in opt.param_groups:
                group["lr"] = lrs[t]
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()


@pytest.mark.parametrize("cls, kw", [
    (torch.optim.AdamW, dict(betas=(0.8, 0.99), eps=1e-6)),
    (torch.optim.SGD, dict(momentum=0.9, dampening=0.5)),  # its buffer starts at the gradient
    (torch.optim.NAdam, {}),  # a 0-d tensor in its state (mu_product)
    (torch_optimizer.Yogi, {}),  # an int step; moments start at 1e-6
    (torch_optimizer.AdaBelief, {}),  # a float in its state (rho_inf)
    (torch_optimizer.QHAdam, {}),  # floats updated every step
], ids=lambda v: getattr(v, "__name__", ""))
def test_torch_rule_on_plain_parameters_is_the_wrapped_optimizer(cls, kw):
    """Unprojected, lo.GaLore(cls) steps as cls itself does (weight decay and lr in full
    space, lr changed between steps), its state flat and loadable with weights_only."""
    from registry import roundtrip

    w0 = torch.randn(6, 5)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    wd = {"weight_decay": 0.1} if cls is torch.optim.AdamW else {}
    ours = lo.GaLore([a], cls, rank=None, **wd, **kw)
    ref = cls([b], **wd, **kw)
    _run_pair(ours, ref, ([a], [b]))
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)
    again = lo.GaLore([torch.nn.Parameter(w0.clone())], cls, rank=None, **wd, **kw)
    again.load_state_dict(roundtrip(ours.state_dict()))
    for k, v in ours.state[a].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, again.state_dict()["state"][0][k]) and v.dtype in (
                torch.float32, torch.float64), k


def test_torch_rule_projected_adam_is_galore_adamw():
    """GaLore(torch.optim.Adam) on projected matrices, across refreshes with the moments
    rotated into each new basis, is GaLoreAdamW (with eps=0 the two ε placements agree)."""
    from registry import make_batches, make_model, train

    m1, m2 = make_model(), make_model()
    kw = dict(lr=1e-2, rank=4, update_proj_gap=3, scale=0.5, weight_decay=0.05)
    o1 = lo.GaLore(m1.parameters(), torch.optim.Adam, eps=0.0, **kw)
    o2 = lo.GaLoreAdamW(m2.parameters(), eps=0.0, **kw)
    train(m1, o1, make_batches(8))
    train(m2, o2, make_batches(8))
    assert o1.state[m1.fc1.weight]["exp_avg"].shape == (32, 4)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_torch_rule_initial_state_is_the_wrapped_optimizers():
    w = torch.nn.Parameter(torch.zeros(5, 3))
    opt = lo.GaLore([w], torch_optimizer.Yogi, rank=None, initial_accumulator=1e-3)
    w.grad = torch.zeros(5, 3)
    opt.step()  # zero gradient: the moments move from their start only by decay
    assert torch.allclose(opt.state[w]["exp_avg"], torch.full((5, 3), 0.9e-3))
    assert "step" in opt.state[w] and opt.state[w]["step"] == 1


@pytest.mark.parametrize("cls, reason", [
    (torch_optimizer.Lamb, r"trust ratio .* parameter's own values"),
    (torch_optimizer.LARS, r"trust ratio .* parameter's own values"),
    (torch_optimizer.Shampoo, r"Kronecker factors of the full matrix"),
    (torch_optimizer.Lookahead, r"slow weights"),
    (torch.optim.Rprop, r"lr is not a plain multiplier"),
])
def test_torch_rule_refuses_optimizers_that_need_the_parameter(cls, reason):
    with pytest.raises(ValueError, match=rf"{cls.__name__} cannot run in the low-rank space: "
                                         rf"its .*{reason}"):
        lo.GaLore([torch.nn.Parameter(torch.zeros(4, 4))], cls, rank=2)


class _PullToZero(torch.optim.Optimizer):
    """p ← p − lr·(g + p): its update needs the parameter's values."""

    def __init__(self, params, lr=0.1, power=1):
        super().__init__(params, dict(lr=lr, power=power))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                step = p.grad + p if group["power"] == 1 else p.grad
                p.sub_(step, alpha=group["lr"] ** group["power"])


@pytest.mark.parametrize("power, match", [(1, r"depends on the parameter's values"),
                                          (2, r"lr is not a plain multiplier")])
def test_torch_rule_probe_detects_what_the_denylist_does_not_name(power, match):
    with pytest.raises(ValueError, match=rf"_PullToZero cannot run in the low-rank space: .*{match}"):
        lo.GaLore([torch.nn.Parameter(torch.zeros(4, 4))], _PullToZero, rank=2, power=power)


def test_torch_rule_argument_errors():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['momentun'\].*momentum"):
        lo.GaLore([w], torch.optim.SGD, rank=2, momentun=0.9)
    with pytest.raises(TypeError, match=r"torch.optim.Optimizer subclass"):
        lo.GaLore([w], "adam", rank=2)
    # AdaMod's exp_avg_lr is not a moment that can be rotated: 'keep' and 'reset' only
    with pytest.raises(ValueError, match=r"state_on_refresh.*\['exp_avg_lr'\]"):
        lo.GaLore([w], torch_optimizer.AdaMod, rank=2)
    lo.GaLore([w], torch_optimizer.AdaMod, rank=2, state_on_refresh="keep")
    # AggMo's betas are a list of any length (its own to check), its state a dict: refused
    # for the state, not for the base's Adam pair
    with pytest.raises(ValueError, match=r"AggMo's state 'momentum_buffer'.*flat low-rank"):
        opt = lo.GaLore([w], torch_optimizer.AggMo, rank=2)
        w.grad = torch.ones(4, 4)
        opt.step()
