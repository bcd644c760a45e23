"""Per-layer mode (``opt.register_hooks(model)``) against normal stepping.

Parameters are independent of one another in every optimizer of the package, so the
order in which the hooks step them does not matter: hooks mode must be bit-identical to
``loss.backward(); opt.step()``. That includes randomized SVD, whose sketches come from
a generator seeded per refresh, not from the global RNG in stepping order.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from registry import (CONFIGS, assert_params_equal, assert_states_equal, loss_fn,
                      make_batches, make_model, mat, roundtrip, train)

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py

every_config = pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
# the first backward in per-layer mode without per-parameter clipping warns that a global
# clip after backward clips nothing (tests/test_reliability.py)
CLIP_WARNING = ".*a global clip after backward"


@every_config
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hooks_equal_normal_stepping(cfg, dtype):
    batches = make_batches(12)
    m1, m2 = cfg.model(dtype=dtype), cfg.model(dtype=dtype)
    o1, o2 = cfg.make(m1.parameters()), cfg.make(m2.parameters())
    l1 = train(m1, o1, batches)
    handle = o2.register_hooks(m2)
    l2 = train(m2, o2, batches, hooks=True)
    assert l1 == l2
    assert_params_equal(m1, m2)
    assert_states_equal(o1, o2)
    assert all(p.grad is None for p in m2.parameters())  # freed as soon as used
    handle.remove()


@every_config
def test_hooks_accumulation_equals_normal_accumulation(cfg):
    n = 3
    batches = make_batches(4 * n)
    m1, m2 = cfg.model(), cfg.model()
    o1, o2 = cfg.make(m1.parameters()), cfg.make(m2.parameters())
    train(m1, o1, batches, accumulate=n)
    with o2.register_hooks(m2, accumulation_steps=n):
        for i, b in enumerate(batches):
            (loss_fn(m2, b) / n).backward()
            stepped = (i + 1) % n == 0
            # gradients are kept between micro-batches and freed by the step
            assert all((p.grad is None) == stepped for p in m2.parameters())
    assert_params_equal(m1, m2)
    assert_states_equal(o1, o2)
    assert o2.state[m2.fc1.bias]["step"] == 4


@every_config
def test_hooks_lr_scheduler(cfg):
    batches = make_batches(8)
    m1, m2 = cfg.model(), cfg.model()
    o1, o2 = cfg.make(m1.parameters()), cfg.make(m2.parameters())
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    train(m1, o1, batches, scheduler=s1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        warnings.filterwarnings("ignore", CLIP_WARNING)
        with o2.register_hooks(m2):
            train(m2, o2, batches, scheduler=s2, hooks=True)
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == cfg.kwargs["lr"] / 16
    assert_params_equal(m1, m2)


@every_config
def test_hooks_save_load_continue(cfg):
    """state_dict / load_state_dict while the hooks are active (load replaces the group
    dicts; the hooks must follow), then a fresh hooked optimizer from the checkpoint."""
    batches = make_batches(14)
    m1 = cfg.model()
    o1 = cfg.make(m1.parameters())
    o1.register_hooks(m1)
    train(m1, o1, batches[:6], hooks=True)
    ckpt = roundtrip({"model": m1.state_dict(), "opt": o1.state_dict()})
    o1.load_state_dict(roundtrip(o1.state_dict()))
    for g in o1.param_groups:
        g["lr"] *= 0.5  # the hooks must read the live group, not a stale dict
    train(m1, o1, batches[6:], hooks=True)

    m2 = cfg.model(seed=7)
    m2.load_state_dict(ckpt["model"])
    o2 = cfg.make(m2.parameters())
    o2.load_state_dict(ckpt["opt"])
    for g in o2.param_groups:
        g["lr"] *= 0.5
    train(m2, o2, batches[6:])  # normal stepping
    assert_params_equal(m1, m2)


def _clip_each(model, c):
    for p in model.parameters():
        torch.nn.utils.clip_grad_norm_([p], c)


@every_config
def test_hooks_per_parameter_clipping(cfg, monkeypatch):
    """Bit-identical to a loop clipping each gradient alone, on every device: the hooks
    call torch.nn.utils.clip_grad_norm_ itself, once per parameter and step (a norm of
    their own, torch.linalg.vector_norm, differed from clip_grad_norm_'s CUDA
    torch._foreach_norm in the last bits)."""
    batches = make_batches(6)
    m1, m2 = cfg.model(), cfg.model()
    o1, o2 = cfg.make(m1.parameters()), cfg.make(m2.parameters())
    for b in batches:
        loss_fn(m1, b).backward()
        _clip_each(m1, 0.05)
        o1.step()
        o1.zero_grad()
    clip, clipped = torch.nn.utils.clip_grad_norm_, []

    def spy(params, *args, **kwargs):
        params = list(params)
        clipped.extend(params)
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    with o2.register_hooks(m2, max_grad_norm_per_param=0.05):
        train(m2, o2, batches, hooks=True)
    assert_params_equal(m1, m2)
    assert len(clipped) == len(batches) * len(list(m2.parameters()))
    assert {id(p) for p in clipped} == {id(p) for p in m2.parameters()}


def test_hooks_errors():
    cfg = CONFIGS[0]
    m = make_model()
    opt = cfg.make(m.parameters())
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0.*max_grad_norm_per_param"):
        opt.register_hooks(m, max_grad_norm=1.0)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=rf"accumulation_steps: {bad}"):
            opt.register_hooks(m, accumulation_steps=bad)
    with pytest.raises(ValueError, match=r"max_grad_norm_per_param: 0\.0"):
        opt.register_hooks(m, max_grad_norm_per_param=0.0)
    with pytest.raises(ValueError, match="None of the model's parameters"):
        opt.register_hooks(make_model())
    with pytest.raises(TypeError, match="scaler: float"):
        opt.register_hooks(m, scaler=2.0 ** 16)
    handle = opt.register_hooks(m)
    with pytest.raises(RuntimeError, match="already"):
        opt.register_hooks(m)
    handle.remove()


def test_hooks_remove_restores_normal_stepping():
    cfg = CONFIGS[0]
    batches = make_batches(8)
    m1, m2 = make_model(), make_model()
    o1, o2 = cfg.make(m1.parameters()), cfg.make(m2.parameters())
    train(m1, o1, batches)
    handle = o2.register_hooks(m2)
    train(m2, o2, batches[:4], hooks=True)
    handle.remove()
    loss_fn(m2, batches[4]).backward()
    assert all(p.grad is not None for p in m2.parameters())  # not consumed any more
    o2.step()
    o2.zero_grad()
    train(m2, o2, batches[5:])
    assert_params_equal(m1, m2)
    # a stray opt.step() in hooks mode is a no-op
    with o2.register_hooks(m2):
        loss_fn(m2, batches[0]).backward()
        before = [p.detach().clone() for p in m2.parameters()]
        o2.step()
        assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), before))


def test_hooks_only_optimized_parameters():
    """Parameters the optimizer does not own are left to the user (their grads stay)."""
    cfg = CONFIGS[0]
    m = make_model()
    opt = cfg.make([mat(m.fc1), m.fc1.bias])
    w2 = mat(m.fc2).detach().clone()
    with opt.register_hooks(m):
        loss_fn(m, make_batches(1)[0]).backward()
    assert mat(m.fc1).grad is None and mat(m.fc2).grad is not None
    assert torch.equal(mat(m.fc2), w2)


@every_config
def test_hooks_stray_step_is_a_no_op_with_accumulation(cfg):
    """A stray opt.step() after each micro-batch must not step the hooked parameters
    (it stepped them with the partial gradient: 8 updates instead of 4)."""
    n = 2
    batches = make_batches(4 * n)
    m1, m2 = cfg.model(), cfg.model()
    o1, o2 = cfg.make(m1.parameters()), cfg.make(m2.parameters())
    train(m1, o1, batches, accumulate=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is covered: no warning
        warnings.filterwarnings("ignore", CLIP_WARNING)
        with o2.register_hooks(m2, accumulation_steps=n):
            for b in batches:
                (loss_fn(m2, b) / n).backward()
                o2.step()
    assert o2.state[m2.fc1.bias]["step"] == 4
    assert_params_equal(m1, m2)
    assert_states_equal(o1, o2)


def _uncovered_setups():
    """(setup, name in the warning): an optimized parameter that no hook steps."""
    cfg = CONFIGS[0]

    def unfrozen_after_register(m):
        m.fc2.bias.requires_grad_(False)
        opt = cfg.make(m.parameters())
        handle = opt.register_hooks(m)
        m.fc2.bias.requires_grad_(True)
        return opt, handle

    def added_after_register(m):
        opt = cfg.make([p for n, p in m.named_parameters() if n != "fc2.bias"])
        handle = opt.register_hooks(m)
        opt.add_param_group({"params": [m.fc2.bias]})
        return opt, handle

    def outside_the_model(m):
        opt = cfg.make(m.parameters())
        return opt, opt.register_hooks(m.fc1)  # emb and fc2 are not in the hooked model

    return [(unfrozen_after_register, r"'fc2\.bias'"),
            (added_after_register, r"'fc2\.bias'"),
            (outside_the_model, r"param_groups\[0\]\['params'\]\[0\]")]


@pytest.mark.parametrize("setup,name", _uncovered_setups(),
                         ids=["unfrozen", "add_param_group", "outside_model"])
def test_hooks_uncovered_parameters_warn_and_step_with_opt_step(setup, name):
    """A parameter of the optimizer that no hook steps is named in a warning (once, at
    the end of the first backward that leaves it a gradient), and opt.step() steps it
    and nothing else: the usual loop (backward, step, zero_grad) with hooks registered
    is bit-identical to normal stepping."""
    cfg = CONFIGS[0]
    batches = make_batches(6)
    m1, m2 = make_model(), make_model()
    o1 = cfg.make(m1.parameters())
    train(m1, o1, batches)
    o2, handle = setup(m2)
    for i, b in enumerate(batches):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loss_fn(m2, b).backward()
        msgs = [str(w.message) for w in seen if "not stepped by the per-layer" in str(w.message)]
        if i == 0:
            assert len(msgs) == 1 and re.search(name, msgs[0]), msgs
            assert "opt.step()" in msgs[0]
        else:
            assert not msgs  # once per parameter
        o2.step()
        o2.zero_grad()
    handle.remove()
    assert_params_equal(m1, m2)
