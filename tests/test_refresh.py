"""Tests of lowrank_optim.refresh: exact firing tables of the refresh/merge policies,
their plain-number state (checkpointable with weights_only=True) and argument checks."""
import io
import re

import pytest
import torch
from hypothesis import given, strategies as st

from lowrank_optim.refresh import Exponential, FixedGap, LazyCosine


def fires(policy, steps: int, state=None, sims=None, start: int = 0):
    """Drive ``policy`` like an optimizer would over ``range(start, steps)``: at each step
    ask ``due``; if due, call ``after``, passing the next value of ``sims`` as the
    similarity unless this is the very first event (empty state). Returns the steps at
    which it fired."""
    state = {} if state is None else state
    sims = iter(sims or [])
    out = []
    for step in range(start, steps):
        if policy.due(state, step):
            policy.after(state, step, next(sims, None) if state else None)
            out.append(step)
    return out


def events(policy, count: int, state=None):
    """The first ``count`` event steps, jumping straight to each next due step."""
    state = {} if state is None else state
    out, step = [], 0
    while len(out) < count:
        assert policy.due(state, step)
        policy.after(state, step)
        out.append(step)
        nxt = next(v for k, v in state.items() if k.endswith("_next"))
        assert nxt > step and not policy.due(state, nxt - 1)
        step = nxt
    return out


def assert_plain(state: dict):
    """State values are plain ints, floats or lists of floats (never bools or tensors)."""
    for key, val in state.items():
        if isinstance(val, list):
            assert all(type(x) is float for x in val), (key, val)
        else:
            assert type(val) in (int, float), (key, type(val))


def save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------
# FixedGap
# ---------------------------------------------------------------------------------------
def test_fixed_gap_table():
    assert fires(FixedGap(3), 20) == [0, 3, 6, 9, 12, 15, 18]
    assert fires(FixedGap(1), 5) == [0, 1, 2, 3, 4]
    assert fires(FixedGap(200), 1000) == [0, 200, 400, 600, 800]


def test_fixed_gap_phase_table():
    assert fires(FixedGap(10, phase=3), 40) == [0, 3, 13, 23, 33]
    assert fires(FixedGap(5, phase=7), 30) == [0, 7, 12, 17, 22, 27]
    assert fires(FixedGap(4, phase=4), 17) == [0, 4, 8, 12, 16]
    assert fires(FixedGap(4, phase=0), 17) == [0, 4, 8, 12, 16]


@given(gap=st.integers(1, 30), phase=st.integers(0, 30), horizon=st.integers(1, 300))
def test_fixed_gap_formula(gap, phase, horizon):
    first = phase if phase > 0 else gap
    expected = [0] + [s for s in range(first, horizon, gap)]
    state = {}
    assert fires(FixedGap(gap, phase), horizon, state) == [s for s in expected if s < horizon]
    assert_plain(state)
    assert state["refresh_count"] == len([s for s in expected if s < horizon])


def test_fixed_gap_first_call_at_any_step():
    # the first call is always due, wherever the caller starts counting
    state = {}
    assert fires(FixedGap(5), 23, state, start=11) == [11, 16, 21]


def test_fixed_gap_due_stays_true_until_after():
    p, state = FixedGap(3), {}
    p.after(state, 0)
    assert not p.due(state, 2)
    assert p.due(state, 3) and p.due(state, 4)  # a skipped refresh stays due


def test_prefix_namespaces_state():
    state = {}
    FixedGap(3, prefix="a").after(state, 0)
    FixedGap(5, prefix="b").after(state, 0)
    assert state == {"a_next": 3, "a_count": 1, "b_next": 5, "b_count": 1}


# ---------------------------------------------------------------------------------------
# LazyCosine
# ---------------------------------------------------------------------------------------
def test_lazy_cosine_grows_once_queue_full_then_repeatedly():
    p = LazyCosine(10, threshold=0.4, queue_size=3, growth=2)
    state = {}
    # first event has no similarity; then every refresh reports a settled subspace
    assert fires(p, 400, state, sims=[0.9] * 100) == [0, 10, 20, 30, 50, 90, 170, 330]
    assert state["refresh_gap"] == 320
    assert state["refresh_sims"] == [0.9, 0.9, 0.9]
    assert_plain(state)


def test_lazy_cosine_never_grows_with_low_similarity():
    p = LazyCosine(10, threshold=0.4, queue_size=3, growth=2)
    state = {}
    assert fires(p, 200, state, sims=[0.1] * 100) == list(range(0, 200, 10))
    assert state.get("refresh_gap", 10) == 10
    assert len(state["refresh_sims"]) == 3


def test_lazy_cosine_waits_for_full_queue():
    p = LazyCosine(10, threshold=0.4, queue_size=5, growth=2)
    state = {}
    # four high similarities are not enough; the fifth triggers growth
    assert fires(p, 51, state, sims=[1.0] * 4) == [0, 10, 20, 30, 40, 50]
    assert state.get("refresh_gap", 10) == 10
    p.after(state, 60, 1.0)
    assert state["refresh_gap"] == 20 and state["refresh_next"] == 80


def test_lazy_cosine_mean_decides():
    p = LazyCosine(10, threshold=0.5, queue_size=3, growth=2)
    state = {}
    p.after(state, 0)
    for step, sim in [(10, 0.2), (20, 0.6), (30, 0.6)]:  # mean 0.467 < 0.5
        p.after(state, step, sim)
    assert state.get("refresh_gap", 10) == 10
    p.after(state, 40, 0.9)  # queue [0.6, 0.6, 0.9], mean 0.7
    assert state["refresh_gap"] == 20 and state["refresh_next"] == 60
    p.after(state, 60, 0.3)  # queue [0.6, 0.9, 0.3], mean 0.6: still settled
    assert state["refresh_gap"] == 40 and state["refresh_next"] == 100
    p.after(state, 100, 0.0)  # queue [0.9, 0.3, 0.0], mean 0.4 < 0.5: gap kept
    assert state["refresh_gap"] == 40 and state["refresh_next"] == 140


def test_lazy_cosine_non_integer_growth_and_phase():
    p = LazyCosine(10, threshold=0.0, queue_size=1, growth=1.5, phase=4)
    state = {}
    assert fires(p, 100, state, sims=[0.0] * 50) == [0, 4, 19, 41, 74]
    assert type(state["refresh_gap"]) is int
    assert_plain(state)


def test_lazy_cosine_similarity_types_stored_as_float():
    p = LazyCosine(5, queue_size=2)
    state = {}
    p.after(state, 0)
    p.after(state, 5, torch.tensor(0.75))
    p.after(state, 10, 1)
    assert state["refresh_sims"] == [0.75, 1.0]
    assert_plain(state)


@given(gap=st.integers(1, 20), threshold=st.floats(0, 1), queue_size=st.integers(1, 6),
       growth=st.floats(1, 3), sims=st.lists(st.floats(0, 1), max_size=40))
def test_lazy_cosine_properties(gap, threshold, queue_size, growth, sims):
    p = LazyCosine(gap, threshold=threshold, queue_size=queue_size, growth=growth)
    state, history, step = {}, [], 0
    p.after(state, 0)
    cur = gap
    for sim in sims:
        step = state["refresh_next"]
        assert p.due(state, step) and not p.due(state, step - 1)
        p.after(state, step, sim)
        history.append(sim)
        new = state.get("refresh_gap", gap)
        window = history[-queue_size:]
        if len(window) == queue_size and sum(window) / queue_size >= threshold:
            assert new == int(cur * growth)
        else:
            assert new == cur  # never grows otherwise
        assert new >= cur
        assert state["refresh_next"] == step + new
        cur = new
        assert len(state["refresh_sims"]) == min(len(history), queue_size)
    assert_plain(state)


# ---------------------------------------------------------------------------------------
# Exponential
# ---------------------------------------------------------------------------------------
def test_exponential_table():
    p = Exponential(first=100, growth=1.2)
    ev = events(p, 10)
    assert ev[:9] == [0, 100, 201, 302, 403, 505, 607, 709, 812]
    gaps = [b - a for a, b in zip(ev, ev[1:])]
    assert gaps[:8] == [100, 101, 101, 101, 102, 102, 102, 103]
    assert [p.gap(k) for k in range(8)] == gaps[:8]
    # the same schedule when polled every step
    assert fires(Exponential(first=100, growth=1.2), 813) == ev[:9]


def test_exponential_defaults_are_loqt():
    assert events(Exponential(), 5) == [0, 100, 201, 302, 403]


def test_exponential_growth_one_is_fixed():
    assert events(Exponential(first=10, growth=1.0), 5) == [0, 10, 21, 32, 43]


def test_exponential_gaps_grow_exponentially():
    p = Exponential(first=5, growth=2.0)
    assert [p.gap(k) for k in range(7)] == [5, 7, 9, 13, 21, 37, 69]
    assert events(p, 6) == [0, 5, 12, 21, 34, 55]


def test_exponential_max_gap_caps_gaps():
    p = Exponential(first=100, growth=1.2, max_gap=101)
    ev = events(p, 8)
    assert [b - a for a, b in zip(ev, ev[1:])] == [100, 101, 101, 101, 101, 101, 101]
    p = Exponential(first=5, growth=2.0, max_gap=20)
    ev = events(p, 8)
    assert [b - a for a, b in zip(ev, ev[1:])] == [5, 7, 9, 13, 20, 20, 20]
    # a cap below `first` caps the first gap too (it caps gaps, not positions)
    assert events(Exponential(first=100, max_gap=40), 4) == [0, 40, 80, 120]


def test_exponential_max_gap_long_run():
    # With a cap the schedule runs forever at max_gap, however many events have passed
    # (growth ** k overflows a float after 1024 events at growth 2).
    p = Exponential(first=1, growth=2.0, max_gap=3)
    state = {}
    ev = events(p, 1100, state)
    gaps = [b - a for a, b in zip(ev, ev[1:])]
    assert gaps[:2] == [1, 3] and set(gaps[1:]) == {3}
    assert state["merge_count"] == 1100


def test_exponential_state_plain_and_checkpointable():
    p = Exponential(first=7, growth=1.5, max_gap=30)
    state = {}
    events(p, 5, state)
    assert set(state) == {"merge_next", "merge_count"}
    assert_plain(state)
    loaded = save_load(state)
    assert loaded == state
    assert_plain(loaded)
    a, b = dict(state), dict(loaded)
    assert fires(p, 400, a, start=state["merge_next"]) == fires(p, 400, b,
                                                                start=state["merge_next"])


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [FixedGap(4), FixedGap(6, phase=2),
                                    LazyCosine(5, threshold=0.3, queue_size=2),
                                    Exponential(first=3, growth=1.7)])
def test_state_survives_weights_only_checkpoint(policy):
    sims = [0.1, 0.8, 0.9, 0.95, 0.2, 0.99, 0.7, 0.5] * 10
    full_state = {}
    uninterrupted = fires(policy, 300, full_state, sims=sims)

    state = {}
    first_half = fires(policy, 150, state, sims=sims)
    assert_plain(state)
    loaded = save_load(state)
    assert loaded == state
    assert_plain(loaded)
    used = len(first_half) - 1  # similarities consumed after the first event
    second_half = fires(policy, 300, loaded, sims=sims[used:], start=150)
    assert first_half + second_half == uninterrupted


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
def _names(value):
    return re.escape(repr(value))


BAD_INTS = [0, -1, 1.5, True, "3", None]


@pytest.mark.parametrize("gap", BAD_INTS)
def test_invalid_gap(gap):
    with pytest.raises(ValueError, match=_names(gap)):
        FixedGap(gap)
    with pytest.raises(ValueError, match=_names(gap)):
        LazyCosine(gap)


@pytest.mark.parametrize("phase", [-1, 1.5, True, "2", None])
def test_invalid_phase(phase):
    with pytest.raises(ValueError, match=_names(phase)):
        FixedGap(5, phase=phase)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_invalid_threshold(threshold):
    with pytest.raises(ValueError, match=_names(threshold)):
        LazyCosine(5, threshold=threshold)


@pytest.mark.parametrize("queue_size", [0, -2, 2.5, True])
def test_invalid_queue_size(queue_size):
    with pytest.raises(ValueError, match=_names(queue_size)):
        LazyCosine(5, queue_size=queue_size)


@pytest.mark.parametrize("growth", [0.5, 0.0, -2.0, float("nan")])
def test_invalid_lazy_growth(growth):
    with pytest.raises(ValueError, match=_names(growth)):
        LazyCosine(5, growth=growth)


@pytest.mark.parametrize("first", BAD_INTS)
def test_invalid_exponential_first(first):
    with pytest.raises(ValueError, match=_names(first)):
        Exponential(first=first)


@pytest.mark.parametrize("growth", [0.99, 0.0, -1.2, float("nan")])
def test_invalid_exponential_growth(growth):
    with pytest.raises(ValueError, match=_names(growth)):
        Exponential(growth=growth)


@pytest.mark.parametrize("max_gap", [0, -5, 1.5, True])
def test_invalid_max_gap(max_gap):
    with pytest.raises(ValueError, match=_names(max_gap)):
        Exponential(max_gap=max_gap)


def test_policies_are_immutable():
    for p in (FixedGap(3), LazyCosine(3), Exponential()):
        with pytest.raises(Exception):
            p.prefix = "x"
