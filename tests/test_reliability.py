"""Issue #17's probes, on every configuration of the registry, in normal and per-layer mode:
non-finite gradients never enter parameters or state (a step is all or nothing: the whole
step in normal mode, each parameter's in per-layer mode); ``GradScaler`` works in both
modes; a global clip that per-layer mode cannot honour warns; a rank too large for a
matrix warns; item 10's small errors. ``step(closure)`` in per-layer mode (Lightning's
call) is ``tests/test_optimizers.py::test_step_with_closure``.
"""
from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowrank_optim as lo
from registry import (CONFIGS, assert_params_equal, assert_states_equal, loss_fn,
                      make_batches, make_model, mat, train)

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py

every_config = pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
modes = pytest.mark.parametrize("per_layer", [False, True], ids=["normal", "per_layer"])
CLIP_WARNING = ".*a global clip after backward"


def _poison(model, cfg, value: float):
    """A hook that turns the gradient of the first layer's matrix into ``value``
    (non-finite) while ``armed[0]`` is set; returns the flag and the parameter."""
    p, armed = mat(model.fc1), [False]
    p.register_hook(lambda g: torch.full_like(g, value) if armed[0] else g)
    return armed, p


def _bad_steps(cfg):
    # a matrix's first basis (step 0) and a later step between refreshes; for LoQT a merge
    # (steps 0, 3, 7: its basis captured in backward, kept for that step only) and a step
    # between merges
    return (0, 4)


def _assert_entries_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k], k


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@every_config
@modes
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_is_skipped(cfg, per_layer, value):
    """A NaN/Inf gradient changes nothing it should not: in normal mode the whole step is
    skipped (no parameter, no state, no step count), in per-layer mode that parameter's
    update; one warning, ``skipped_steps`` counts it; training continues finite, and in
    normal mode exactly as if the batch had never been seen."""
    batches = make_batches(8)
    bad = _bad_steps(cfg)[value == float("inf")]
    model, ref = cfg.model(), cfg.model()
    opt, ref_opt = cfg.make(model.parameters()), cfg.make(ref.parameters())
    armed, p = _poison(model, cfg, value)
    handle = opt.register_hooks(model) if per_layer else None
    for i, b in enumerate(batches):
        before = _snapshot(model, opt)
        p_state = copy.deepcopy(opt.state.get(p, {}))
        p_before = p.detach().clone()
        armed[0] = i == bad
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(model, opt, [b], hooks=per_layer)
        msgs = [str(w.message) for w in seen if "non-finite gradient" in str(w.message)]
        if i != bad:
            assert not msgs
            if not per_layer:
                train(ref, ref_opt, [b])
            continue
        assert len(msgs) == 1 and "param_groups[0]['params']" in msgs[0], msgs
        assert opt.skipped_steps == 1
        assert torch.equal(p, p_before)
        _assert_entries_equal(opt.state.get(p, {}), p_state)
        if not per_layer:
            after = _snapshot(model, opt)
            for k, v in before[0].items():
                assert torch.equal(v, after[0][k]), k
            assert after[1]["state"].keys() == before[1]["state"].keys()
            for i, st in after[1]["state"].items():
                _assert_entries_equal(st, before[1]["state"][i])
    assert all(torch.isfinite(q).all() for q in model.parameters())
    if not per_layer:
        assert_params_equal(model, ref)
        assert_states_equal(opt, ref_opt)
    else:
        handle.remove()


def test_nonfinite_gradient_goes_in_when_asked():
    """``skip_nonfinite = False``: torch's behaviour (the NaN enters the parameter)."""
    cfg = CONFIGS[0]
    model = cfg.model()
    opt = cfg.make(model.parameters())
    opt.skip_nonfinite = False
    train(model, opt, make_batches(2))
    armed, p = _poison(model, cfg, float("nan"))
    armed[0] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the projector's own non-finite warning
        train(model, opt, make_batches(1))
    assert torch.isnan(p).any() and opt.skipped_steps == 0
    assert copy.deepcopy(opt).skip_nonfinite is False


def _scaler(**kwargs) -> torch.amp.GradScaler:
    """A GradScaler for the test device (``LOWRANK_TEST_DEVICE``, see conftest.py)."""
    return torch.amp.GradScaler(torch.empty(0).device.type, **kwargs)


def _scaled_run(cfg, per_layer, overflow_at=None, steps=6):
    """Train with a GradScaler (``register_hooks(model, scaler=scaler)`` in per-layer
    mode), an overflow injected into one matrix's gradient at ``overflow_at``; returns the
    model, optimizer, scales, and the states and values of that matrix and of the last
    bias before and after the overflow step."""
    model = cfg.model()
    opt = cfg.make(model.parameters())
    scaler = _scaler(init_scale=2.0 ** 12)
    armed, p = _poison(model, cfg, float("inf"))
    handle = opt.register_hooks(model, scaler=scaler) if per_layer else None
    scales, around = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", CLIP_WARNING)
        warnings.simplefilter("error", RuntimeWarning)  # an overflow is not warned about
        for i, b in enumerate(make_batches(steps)):
            armed[0] = i == overflow_at
            if armed[0] or i == 0:
                around.append([copy.deepcopy((q.detach(), opt.state.get(q, {})))
                               for q in (p, model.fc2.bias)])
            scaler.scale(loss_fn(model, b)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(scaler.get_scale())
            if armed[0]:
                around.append([copy.deepcopy((q.detach(), opt.state.get(q, {})))
                               for q in (p, model.fc2.bias)])
    if handle is not None:
        handle.remove()
    return model, opt, scales, around


@every_config
def test_grad_scaler_per_layer_equals_normal(cfg):
    """Per-layer mode with ``scaler=`` unscales each gradient before its update: the
    result is normal mode's with the same scaler, bit for bit."""
    m1, o1, s1, _ = _scaled_run(cfg, per_layer=False)
    m2, o2, s2, _ = _scaled_run(cfg, per_layer=True)
    assert s1 == s2 == [2.0 ** 12] * 6
    assert_params_equal(m1, m2)
    assert_states_equal(o1, o2)


@every_config
@modes
def test_grad_scaler_overflow_is_skipped_and_lowers_the_scale(cfg, per_layer):
    """An overflow skips the step (normal mode: GradScaler skips opt.step; per-layer mode:
    the overflowing parameter's update), is reported to the scaler, which halves the
    scale, and is not warned about or counted as ``skipped_steps``."""
    bad = _bad_steps(cfg)[1]
    model, opt, scales, (_, before, after) = _scaled_run(cfg, per_layer, overflow_at=bad)
    assert scales[bad] == scales[bad - 1] / 2 == 2.0 ** 11
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert opt.skipped_steps == 0
    (p0, s0), (b0, t0) = before
    (p1, s1), (b1, t1) = after
    assert torch.equal(p0, p1)
    _assert_entries_equal(s0, s1)
    # the parameters that did not overflow: skipped too in normal mode, not in per-layer
    assert t1["step"] == t0["step"] + per_layer
    assert torch.equal(b0, b1) != per_layer


def test_grad_scaler_in_per_layer_mode_without_it_raises():
    cfg = CONFIGS[0]
    model = cfg.model()
    opt = cfg.make(model.parameters())
    scaler = _scaler()
    opt.register_hooks(model, max_grad_norm_per_param=1.0)
    scaler.scale(loss_fn(model, make_batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match=r"without its scaler.*register_hooks\(model, "
                                           r"scaler=scaler\)"):
        scaler.step(opt)


def _lightning_step(model, opt, batch, scaler=None):
    """One optimizer step as Lightning 2.x's automatic optimization makes it: a closure
    (training_step, zero_grad, backward) passed to ``opt.step(closure=...)`` (32-bit), or
    with a scaler (16-mixed) run first, ``scaler.unscale_`` unless the optimizer handles
    the unscaling (``_step_supports_amp_scaling``), then ``scaler.step``/``update``."""
    def closure():
        loss = loss_fn(model, batch)
        opt.zero_grad()
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss.detach()
    if scaler is None:
        return opt.step(closure=closure)
    loss = closure()
    if not getattr(opt, "_step_supports_amp_scaling", False):
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    return loss


@every_config
def test_lightning_call_sequence(cfg):
    """Lightning's call sequences, 32-bit and 16-mixed (lightning is not installed here;
    ``_lightning_step`` copies them): per-layer mode (with ``scaler=``) computes what
    normal stepping does, and returns the closure's loss."""
    batches = make_batches(4)
    runs = []
    for per_layer in (False, True):
        model = cfg.model()
        opt = cfg.make(model.parameters())
        losses = []
        for scaler in (None, _scaler(init_scale=2.0 ** 12)):
            handle = opt.register_hooks(model, scaler=scaler, max_grad_norm_per_param=1e9
                                        ) if per_layer else None
            assert getattr(opt, "_step_supports_amp_scaling", False) == per_layer
            losses += [_lightning_step(model, opt, b, scaler).item() for b in batches]
            if handle is not None:
                handle.remove()
        runs.append((model, opt, losses))
    assert runs[0][2] == runs[1][2]
    assert_params_equal(runs[0][0], runs[1][0])
    assert_states_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("variant", ["uncovered", "accumulation"])
def test_grad_scaler_per_layer_variants(variant):
    """Per-layer mode with a scaler equals normal mode with it: ``uncovered``, the
    parameters no hook steps (all but the hooked fc1's) are stepped by
    ``scaler.step(opt)``, unscaled; ``accumulation``, with ``accumulation_steps=2`` the
    gradients stay scaled between micro-batches and are unscaled once, before the step."""
    cfg, n = CONFIGS[0], 2 if variant == "accumulation" else 1
    runs = []
    for per_layer in (False, True):
        model = cfg.model()
        opt = cfg.make(model.parameters())
        scaler = _scaler(init_scale=2.0 ** 12)
        if per_layer:
            opt.register_hooks(model.fc1 if variant == "uncovered" else model, scaler=scaler,
                               accumulation_steps=n, max_grad_norm_per_param=1e9)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*not stepped by the per-layer hooks")
            for i, b in enumerate(make_batches(4 * n)):
                scaler.scale(loss_fn(model, b) / n).backward()
                if (i + 1) % n == 0:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
        runs.append((model, opt))
    assert_params_equal(runs[0][0], runs[1][0])
    assert_states_equal(runs[0][1], runs[1][1])


def test_global_clip_warning():
    """Per-layer mode without per-parameter clipping warns, once, at the end of the first
    backward, that a global clip after backward clips nothing; not in normal mode, and
    not with ``max_grad_norm_per_param``."""
    cfg = CONFIGS[0]
    for per_layer, kwargs, expected in ((True, {}, True), (False, {}, False),
                                        (True, {"max_grad_norm_per_param": 1.0}, False)):
        model = cfg.model()
        opt = cfg.make(model.parameters())
        handle = opt.register_hooks(model, **kwargs) if per_layer else None
        for i, b in enumerate(make_batches(3)):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                train(model, opt, [b], hooks=per_layer)
            msgs = [w for w in seen if re.match(CLIP_WARNING, str(w.message))]
            assert len(msgs) == (expected and i == 0), (kwargs, i)
            if msgs:
                assert "clip_grad_norm_" in str(msgs[0].message)
                assert "max_grad_norm_per_param" in str(msgs[0].message)
        if handle is not None:
            handle.remove()


RANKED = [c for c in CONFIGS if c.supports_group_rank and c.kwargs.get("rank")]


@pytest.mark.parametrize("cfg", RANKED, ids=repr)
def test_rank_too_large_warns(cfg):
    """A rank whose projected state is at least the unprojected one's warns once, at
    construction, naming the parameter, its shape and a rank that saves memory."""
    model = nn.Linear(128, 160)  # rank 128 on a 128-wide matrix: nothing saved, any side
    with pytest.warns(UserWarning, match=r"projection costs") as seen:
        cfg.make(model.parameters(), rank=128)
    msg = str([w for w in seen if "projection costs" in str(w.message)][0].message)
    assert re.search(r"param_groups\[0\]\['params'\]\[\d\] \(shape \(\d+, \d+\)\) at rank "
                     r"128: \d+\.\d\dx; (rank <= \d+ saves memory|no rank saves)", msg), msg
    # the rank named saves memory
    m = re.search(r"rank <= (\d+) saves", msg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if m:
            cfg.make(model.parameters(), rank=int(m.group(1)))


def test_rank_warning_for_an_added_group():
    opt = lo.GaLoreAdamW(nn.Linear(512, 512).parameters(), rank=64)
    with pytest.warns(UserWarning, match=r"param_groups\[1\]\['params'\]\[0\] \(shape "
                                         r"\(128, 128\)\) at rank 128"):
        opt.add_param_group({"params": nn.Linear(128, 128).parameters(), "rank": 128})


@pytest.mark.parametrize("cls", sorted({c.cls for c in CONFIGS}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_bare_tensor_params_raise_torchs_type_error(cls):
    with pytest.raises(TypeError, match="params argument given to the optimizer should be "
                                        "an iterable of Tensors or dicts"):
        cls(torch.zeros(3, requires_grad=True))


def test_numpy_rank_is_accepted_and_saved_as_int():
    model = make_model()
    opt = lo.GaLoreAdamW([{"params": model.parameters(), "rank": np.int64(4),
                           "update_proj_gap": np.int32(3), "betas": (np.float64(0.9), 0.99)}])
    train(model, opt, make_batches(2))
    g = opt.param_groups[0]
    assert type(g["rank"]) is int and type(g["update_proj_gap"]) is int
    assert type(g["betas"][0]) is float
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))


@every_config
def test_pickle_with_hooks_active(cfg):
    """The optimizer and the model pickle in per-layer mode (mid-accumulation too); the
    copy has no hooks and takes new ones; the handle itself refuses with a clear error."""
    model = cfg.model()
    opt = cfg.make(model.parameters())
    handle = opt.register_hooks(model, accumulation_steps=2, max_grad_norm_per_param=1e9)
    train(model, opt, make_batches(3), hooks=True)
    m2, o2 = pickle.loads(pickle.dumps((model, opt)))
    assert o2._hooks is None
    o2.register_hooks(m2, max_grad_norm_per_param=1e9)
    train(m2, o2, make_batches(2), hooks=True)
    with pytest.raises(TypeError, match="HooksHandle cannot be pickled"):
        pickle.dumps(handle)
    handle.remove()


def test_warnings_after_a_backward_that_raised():
    """A backward that raised half-way (here: a scaler registered, the loss not scaled)
    does not stop the end-of-backward checks of the next ones."""
    cfg = CONFIGS[0]
    model = cfg.model()
    opt = cfg.make(model.parameters())
    scaler = _scaler()
    handle = opt.register_hooks(model, scaler=scaler)
    with pytest.raises(RuntimeError, match=r"not scaled; call scaler\.scale\(loss\)"):
        loss_fn(model, make_batches(1)[0]).backward()
    with pytest.warns(UserWarning, match=CLIP_WARNING):
        scaler.scale(loss_fn(model, make_batches(1)[0])).backward()
    handle.remove()


def test_hf_trainer_fp16_sequence_in_per_layer_mode():
    """HF Trainer / accelerate with fp16: ``scaler.unscale_(opt)``, ``clip_grad_norm_``
    (nothing left to clip in per-layer mode: the first backward warned), ``scaler.step``,
    ``scaler.update``; an overflow in the hooks still lowers the scale."""
    cfg = CONFIGS[0]
    model = cfg.model()
    opt = cfg.make(model.parameters())
    scaler = _scaler(init_scale=2.0 ** 12)
    armed, p = _poison(model, cfg, float("inf"))
    opt.register_hooks(model, scaler=scaler)
    scales = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", CLIP_WARNING)
        for i, b in enumerate(make_batches(4)):
            armed[0] = i == 2
            scaler.scale(loss_fn(model, b)).backward()
            scaler.unscale_(opt)
            assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) == 0
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(scaler.get_scale())
    assert scales == [2.0 ** 12] * 2 + [2.0 ** 11] * 2
    assert all(torch.isfinite(q).all() for q in model.parameters())
