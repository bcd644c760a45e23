"""Loading the wrong state dict (issue 17, item 6): ``load_state_dict`` validates the
whole file before it changes anything. A state dict of another optimizer class (torch's
AdamW included) or a hand-edited one raises a ``ValueError`` that names the group or
parameter, the key, what was found and what is allowed; the optimizer is then exactly as
before: it steps like a twin that never saw the bad file."""
from __future__ import annotations

import pytest
import torch

import lowrank_optim as lo
from registry import BY_ID, assert_params_equal, assert_states_equal, make_batches, roundtrip, train

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def _pair(cfg, steps=4):
    """Two identical (model, optimizer) pairs, each trained ``steps`` steps."""
    out = []
    for _ in range(2):
        m = cfg.model()
        o = cfg.make(m.parameters())
        train(m, o, make_batches(steps))
        out += [m, o]
    return out


def _refused(cfg, bad: dict, match: str):
    """Loading ``bad`` raises ValueError(match) and leaves the optimizer as its twin."""
    m, o, twin_m, twin_o = _pair(cfg)
    groups = roundtrip(o.state_dict())["param_groups"]
    with pytest.raises(ValueError, match=match):
        o.load_state_dict(bad)
    assert roundtrip(o.state_dict())["param_groups"] == groups
    assert_states_equal(o, twin_o)
    batches = make_batches(5, seed=3)
    train(m, o, batches)
    train(twin_m, twin_o, batches)
    assert_params_equal(m, twin_m)
    assert_states_equal(o, twin_o)


def _saved(cfg, steps=4, **kw) -> dict:
    """The state dict (through bytes) of ``cfg`` trained ``steps`` steps."""
    m = cfg.model()
    o = cfg.make(m.parameters(), **kw)
    train(m, o, make_batches(steps))
    return roundtrip(o.state_dict())


@pytest.mark.parametrize("cfg_id,foreign,pattern", [
    ("galore_adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2), r"param group 0.*'rank'"),
    ("loqt_nf4", lambda ps: lo.GaLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=3),
     r"LoQTAdamW.*param group 0"),
], ids=["torch_adamw_into_galore", "galore_adamw_into_loqt"])
def test_state_dict_of_another_class_is_refused(cfg_id, foreign, pattern):
    cfg = BY_ID[cfg_id]
    m = cfg.model()
    other = foreign(m.parameters())
    train(m, other, make_batches(4))
    _refused(cfg, roundtrip(other.state_dict()), pattern)


def test_galore_adamw_into_adafactor_is_refused():
    _refused(BY_ID["galore_adafactor"], _saved(BY_ID["galore_adamw"]),
             r"GaLoreAdafactor.*param group 0.*'beta1'")


def test_8bit_state_into_float_rule_is_refused():
    _refused(BY_ID["galore_adamw"], _saved(BY_ID["galore_adamw8bit"]),
             r"parameter \d+.*'exp_avg")


def test_bad_proj_side_is_refused():
    sd = _saved(BY_ID["galore_adamw"])
    i = next(i for i, st in sd["state"].items() if "proj_side" in st)
    sd["state"][i]["proj_side"] = 7
    _refused(BY_ID["galore_adamw"], sd, rf"parameter {i}\b.*'proj_side'.*7.*0, 1, 2")


def test_bad_group_option_is_refused():
    sd = _saved(BY_ID["galore_adamw"])
    sd["param_groups"][0]["update_proj_gap"] = 0
    _refused(BY_ID["galore_adamw"], sd, r"param group 0.*update_proj_gap: 0\b")


@pytest.mark.parametrize("key,value", [("step", -1), ("step", 2.5), ("refresh_next", "x")])
def test_bad_counter_is_refused(key, value):
    sd = _saved(BY_ID["galore_adamw"])
    i = next(i for i, st in sd["state"].items() if "proj_side" in st)
    sd["state"][i][key] = value
    _refused(BY_ID["galore_adamw"], sd, rf"parameter {i}\b.*'{key}'.*{value!r}")


@pytest.mark.parametrize("cfg_id,key,tamper,pattern", [
    ("galore_adamw8bit", "exp_avg_absmax", lambda t: t[:0], r"'exp_avg_absmax'.*\(0,\).*\(1,\)"),
    ("q_galore", "proj_scale", lambda t: t[:1], r"'proj_scale'.*\(1,\)"),
    ("galore_adamw8bit", "exp_avg_codes", lambda t: t.float(), r"'exp_avg_codes'.*float32.*uint8"),
], ids=["truncated_8bit_absmax", "truncated_q_galore_proj_scale", "wrong_dtype"])
def test_tampered_state_tensor_is_refused(cfg_id, key, tamper, pattern):
    cfg = BY_ID[cfg_id]
    sd = _saved(cfg)
    i = next(i for i, st in sd["state"].items() if key in st)
    sd["state"][i][key] = tamper(sd["state"][i][key])
    _refused(cfg, sd, rf"parameter {i}\b.*" + pattern)


def test_missing_state_tensor_is_refused():
    cfg = BY_ID["galore_adamw"]
    sd = _saved(cfg)
    i = next(i for i, st in sd["state"].items() if "proj_side" in st)
    del sd["state"][i]["proj"]
    _refused(cfg, sd, rf"parameter {i}\b.*'proj'.*missing")
