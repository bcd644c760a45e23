"""Inner rules as objects (lowrank_optim.rules) and the base's put-back step.

Each rule declares the shapes of the state it creates, validates its own
hyperparameters with an error naming the value, and moves its moments along a basis
change; a method that assembles its update differently overrides ``_put_back_`` only.
"""
from __future__ import annotations

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
    (lo.GaLoreAdafactor, "clip_threshold", 0.0)])
def test_rule_hyperparameters_are_validated_per_group(cls, key, value):
    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=rf"{key}: {value!r}"):
        cls([{"params": [w], key: value}], rank=2)


def test_put_back_is_the_one_step_a_method_overrides():
    """A Fira-like method: the GaLore update plus a scaled residual of the full gradient,
    written by overriding _put_back_ (with needs_full_grad), nothing else."""

    class Residual(lo.GaLoreAdamW):
        needs_full_grad = True

        def _put_back_(self, w, d, group, state, proj, g):
            super()._put_back_(w, d, group, state, proj, g)
            if proj is not None:
                back = torch.zeros_like(w)
                proj.add_back_(state, back, proj.project(state, g), alpha=1.0)
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
