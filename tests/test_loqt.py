"""LoQT: the layer, the merge, the schedule, and equivalence with one-sided GaLore.

The common suite (test_optimizers.py, test_hooks.py) runs LoQTAdamW/LoQTAdamW8bit through
the registry's ``loqt_*`` configurations; this file checks what is LoQT's own.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim.projector import LEFT, RIGHT
from registry import generator, loss_fn, make_batches, make_model, roundtrip, train

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py

FORMATS = {  # prepare_loqt / LoQTLinear storage options
    "nf4": dict(bits=4),
    "int4": dict(bits=4, quant_type="int"),
    "int8": dict(bits=8, quant_type="int"),
    "nf4_float_P": dict(bits=4, proj_bits=None),
    "none": dict(bits=None, proj_bits=None),
}
SHAPES = [(48, 32), (32, 48), (40, 40)]  # (in, out): tall (RIGHT), wide (LEFT), square


def _armed_backward(layer, x, seed=0):
    layer.capture = 1
    g = generator(seed)
    y = layer(x)
    (y * torch.randn(y.shape, generator=g)).sum().backward()


def _layer(shape, fmt="nf4", rank=4, merges=1, **kw):
    """A LoQT layer after ``merges`` merges (so P is a real basis), with a random B."""
    torch.manual_seed(0)
    layer = lo.LoQTLinear.from_linear(nn.Linear(*shape), rank=rank, **FORMATS[fmt], **kw)
    for i in range(merges):
        _armed_backward(layer, torch.randn(7, shape[0]), seed=i)
        layer.merge_()
        layer.zero_grad()
    with torch.no_grad():
        layer.B.normal_(std=0.1)
    return layer


# ---- the layer -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_is_dequantized_weight_plus_low_rank(fmt, shape):
    layer = _layer(shape, fmt)
    x = torch.randn(5, 3, shape[0])
    q, p, b, s = layer.base_weight(), layer.projection(), layer.B.detach(), layer.scale
    delta = p @ b if layer.side == LEFT else b @ p.T  # P·B, or B·Pᵀ
    expected = x @ q.T + s * x @ delta.T + layer.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.effective_weight(), q + s * delta)
    # the side rule: P spans the smaller dimension; B carries the larger one
    m, n = shape[1], shape[0]
    assert p.shape == (min(m, n), 4)
    assert layer.B.shape == ((m, 4) if m >= n else (4, n))
    assert layer.side == (RIGHT if m >= n else LEFT)


def test_before_the_first_merge_the_layer_is_its_quantized_weight():
    lin = nn.Linear(32, 16)
    layer = lo.LoQTLinear.from_linear(lin, rank=4)
    x = torch.randn(3, 32)
    assert torch.equal(layer.projection(), torch.zeros(16, 4))
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.base_weight(), lin.bias))
    err = (layer.base_weight() - lin.weight).abs()
    assert err.max() < 0.2 * lin.weight.abs().max() and err.mean() < 0.05 * lin.weight.abs().max()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_only_B_and_bias_get_gradients_and_they_are_right(shape):
    layer = _layer(shape, "int8")
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"B", "bias"}
    assert all(not b.is_floating_point() or not b.requires_grad for b in layer.buffers())
    x = torch.randn(6, shape[0], requires_grad=True)
    (layer(x) ** 2).sum().backward()
    # reference: the same function through plain autograd on a dense weight
    w = layer.base_weight().requires_grad_(False)
    b = layer.B.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    p = layer.projection()
    delta = p @ b if layer.side == LEFT else b @ p.T
    (nn.functional.linear(x2, w + layer.scale * delta, bias) ** 2).sum().backward()
    torch.testing.assert_close(layer.B.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_backward_saves_only_the_input():
    """No dense weight (nor its gradient) is kept for backward: the autograd graph of a
    LoQT layer holds its input and tensors the layer holds anyway (B, the codes and
    scales of Q and P), nothing new of the weight's size."""
    layer = _layer((64, 96), "nf4", rank=8)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                  lambda t: t):
        y = layer(x)
    own = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    new = [t for t in saved if t.data_ptr() not in own]
    assert len(new) == 1 and new[0] is x
    y.sum().backward()
    assert layer.B.grad.shape == layer.B.shape and not layer.merge_ready


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_armed_backward_captures_the_basis_of_the_dense_gradient(shape):
    """An armed backward takes the new P from the SVD of this layer's dense gradient and
    returns ∂L/∂B in the new basis; the dense gradient itself is not kept."""
    layer = _layer(shape, "none")
    x = torch.randn(9, shape[0])
    y_grad = torch.randn(9, shape[1])
    layer.capture = 1
    layer(x).backward(y_grad)
    g = y_grad.T @ x  # the dense gradient of the weight
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    st = layer._pending[0]
    new = st["proj"]
    ref = vh[:4].T if layer.side == RIGHT else u[:, :4]
    torch.testing.assert_close(new.abs(), ref.abs(), rtol=1e-4, atol=1e-5)
    expected = layer.scale * (g @ new if layer.side == RIGHT else new.T @ g)
    torch.testing.assert_close(layer.B.grad, expected, rtol=1e-4, atol=1e-5)
    assert all(t.numel() <= new.numel() for t in st.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_error_compensation_lowers_merge_error(fmt, shape):
    layer = _layer(shape, fmt, merges=2)
    _armed_backward(layer, torch.randn(7, shape[0]), seed=9)
    target = layer.effective_weight()  # what the merge must represent
    plain = copy.deepcopy(layer)
    layer.merge_(ec_iters=5)
    plain.merge_(ec_iters=0)
    err = torch.linalg.matrix_norm(layer.effective_weight() - target)
    err0 = torch.linalg.matrix_norm(plain.effective_weight() - target)
    assert torch.count_nonzero(plain.B) == 0
    assert err < 0.95 * err0, (float(err), float(err0))


def test_unquantized_merge_keeps_the_function():
    layer = _layer((32, 48), "none", merges=2)
    _armed_backward(layer, torch.randn(7, 32), seed=5)
    before = layer.effective_weight()
    layer.merge_()
    assert torch.count_nonzero(layer.B) == 0
    torch.testing.assert_close(layer.effective_weight(), before, rtol=0, atol=1e-6)


def test_merge_without_a_captured_basis_raises(device):
    layer = lo.LoQTLinear(8, 8, rank=2, device=device)
    with pytest.raises(RuntimeError, match="no basis captured"):
        layer.merge_()


def test_storage_dtypes_sizes_and_bf16(device):
    # the defaults: NF4 blocks of 32 with an 8-bit absmax (groups of 256 blocks), INT8 P
    # (device=: conftest's test device covers the tests' own factory calls, not the package's)
    layer = lo.LoQTLinear(256, 128, rank=16, device=device)
    sd = layer.state_dict()
    assert sd["weight_codes"].dtype == torch.uint8 and sd["weight_codes"].numel() == 128 * 256 // 2
    assert sd["weight_scale_codes"].dtype == torch.uint8
    assert sd["weight_scale_codes"].numel() == 128 * 256 // 32
    assert sd["weight_scale_scale"].numel() == sd["weight_scale_offset"].numel() == 4
    assert sd["proj_codes"].numel() == 128 * 16 and sd["proj_offset"].numel() == 32
    assert set(sd) == {"weight_codes", "weight_scale_codes", "weight_scale_scale",
                       "weight_scale_offset", "proj_codes", "proj_scale", "proj_offset",
                       "merges", "B", "bias"}
    assert "nf4/32+dq" in repr(layer) and "proj_bits=8" in repr(layer)
    # the reference's layout: NF4 blocks of 64 with a float32 absmax, INT4 P groups of 64
    ref = lo.LoQTLinear(256, 128, rank=16, group_size=64, double_quant=False, proj_bits=4,
                        device=device)
    sd = ref.state_dict()
    assert sd["weight_codes"].dtype == torch.uint8 and sd["weight_codes"].numel() == 128 * 256 // 2
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].numel() == 512
    assert sd["proj_codes"].numel() == 128 * 16 // 2 and sd["proj_offset"].numel() == 32
    assert set(sd) == {"weight_codes", "weight_scale", "proj_codes", "proj_scale",
                       "proj_offset", "merges", "B", "bias"}
    # integer Q: blocks of 64 and no double quantization unless asked
    assert "int4/64" in repr(lo.LoQTLinear(256, 128, rank=16, quant_type="int", device=device))
    for lay in (layer, ref):
        lay.to(torch.bfloat16)
        assert lay.B.dtype == torch.bfloat16 and lay.proj_scale.dtype == torch.float32
        assert lay.weight_codes.dtype == torch.uint8 and lay.proj_codes.dtype == torch.uint8
    assert ref.weight_scale.dtype == layer.weight_scale_scale.dtype == torch.float32


def test_double_quant_storage_is_smaller_and_close():
    """NF4 blocks of 32 with a double-quantized absmax take fewer bytes than blocks of 64
    without (4.26 vs 4.5 bits per weight), the absmax buffers stay float32 through a bf16
    cast, and the dequantized weight is the plain NF4 one up to the absmax's 8-bit step."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    nbytes = lambda layer: sum(b.numel() * b.element_size()
                               for k, b in layer.named_buffers() if k.startswith("weight"))
    plain64 = lo.LoQTLinear.from_linear(lin, rank=16, group_size=64, double_quant=False)
    plain32 = lo.LoQTLinear.from_linear(lin, rank=16, group_size=32, double_quant=False)
    dq32 = lo.LoQTLinear.from_linear(lin, rank=16, group_size=32, double_quant=True)
    assert nbytes(dq32) == 128 * 256 // 2 + 1024 + 8 * 4 < nbytes(plain64) < nbytes(plain32)
    assert set(dq32.state_dict()) == {"weight_codes", "weight_scale_codes", "weight_scale_scale",
                                      "weight_scale_offset", "proj_codes", "proj_scale",
                                      "proj_offset", "merges", "B", "bias"}
    w32, w = plain32.base_weight(), dq32.base_weight()
    assert float((w - w32).abs().max()) < 1e-2 * float(w32.abs().max())
    assert "nf4/32+dq" in repr(dq32)
    dq32.to(torch.bfloat16)
    assert dq32.weight_scale_scale.dtype == dq32.weight_scale_offset.dtype == torch.float32
    assert torch.equal(dq32.base_weight(), w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), r"rank: 0\b"),
    (dict(bits=8, double_quant=True), r"double_quant: True"),
    (dict(bits=None, double_quant=True), r"double_quant: True"),
    (dict(scale=0.0), r"scale: 0\.0"),
    (dict(bits=8, quant_type="nf4"), r"bits: 8\b.*nf4"),
    (dict(bits=9, quant_type="int"), r"bits: 9\b"),
    (dict(quant_type="fp8"), r"quant_type: 'fp8'"),
    (dict(group_size=0), r"group_size: 0\b"),
    (dict(proj_bits=1), r"bits: 1\b"),
    (dict(svd="qr"), r"svd: 'qr'"),
])
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.prepare_loqt(make_model(), target_modules=None, **{"rank": 4, **kwargs})


def test_prepare_loqt_targets():
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=("fc1",))
    assert isinstance(m.fc1, lo.LoQTLinear) and type(m.fc2) is nn.Linear
    with pytest.raises(ValueError, match="No nn.Linear"):
        lo.prepare_loqt(make_model(), target_modules=("attn",))


# ---- the optimizer ---------------------------------------------------------------------


def _merge_steps(opt_kwargs, steps, accumulate=1, hooks=False, per_layer=False, **prep):
    m = lo.prepare_loqt(make_model(), target_modules=None, **{"rank": 4, **prep})
    opt = lo.LoQTAdamW(m.parameters(), lr=1e-2, **opt_kwargs)
    handle = opt.register_hooks(m, accumulation_steps=accumulate) if hooks else None
    fired, last = {"fc1": [], "fc2": []}, {"fc1": 0, "fc2": 0}
    batches = make_batches(steps * accumulate)
    for t in range(steps):
        for b in batches[t * accumulate:(t + 1) * accumulate]:
            with torch.no_grad():
                m(b[0], b[1])  # extra forwards (evaluation) do not move the schedule
            (loss_fn(m, b) / accumulate).backward()
        if not hooks:
            opt.step()
            opt.zero_grad()
        for name in fired:
            merges = int(getattr(m, name).merges)
            if merges != last[name]:
                fired[name].append(t)
                last[name] = merges
    if handle is not None:
        handle.remove()
    if per_layer:
        return fired
    assert fired["fc1"] == fired["fc2"]
    return fired["fc1"]


@pytest.mark.parametrize("mode", ["normal", "hooks", "hooks_accumulate"])
def test_merge_schedule_fires_at_the_listed_steps(mode):
    # tau = 3, psi = 1.5: gaps 3, 3+1, 3+2, 3+3, 3+5, 3+7 -> 0, 3, 7, 12, 18, 26, 36
    kw = dict(update_proj_gap=3, increment_size=1.5, stagger=False)
    fired = _merge_steps(kw, 40, accumulate=2 if mode == "hooks_accumulate" else 1,
                         hooks=mode != "normal")
    assert fired == [0, 3, 7, 12, 18, 26, 36]
    expected = [0]
    policy = lo.Exponential(3, 1.5)
    for k in range(6):
        expected.append(expected[-1] + policy.gap(k))
    assert fired == expected


def test_stagger_offsets_each_layers_merges():
    """stagger=True: layer i of N merges at 0, then at phi_i = round(tau (i+1) / N), then
    with the same growing gaps; the last layer keeps the unstaggered schedule."""
    kw = dict(update_proj_gap=4, increment_size=1.5)
    fired = _merge_steps(kw, 30, per_layer=True)  # stagger is the default
    plain = _merge_steps({**kw, "stagger": False}, 30)
    assert plain == [0, 4, 9, 15, 22]  # gaps 4, 4+1, 4+2, 4+3
    assert fired["fc2"] == plain
    assert fired["fc1"] == [0, 2, 7, 13, 20, 29]  # phi = 2, then gaps 5, 6, 7, 9


def test_max_proj_gap_caps_the_interval():
    fired = _merge_steps(dict(update_proj_gap=3, increment_size=2.0, max_proj_gap=6,
                              stagger=False), 30)
    assert fired == [0, 3, 8, 14, 20, 26]  # gaps 3, 3+2, then capped at 6


@pytest.mark.parametrize("policy,stagger", [("keep", False), ("project", False),
                                            ("project", True)])
def test_unquantized_loqt_equals_one_sided_galore(policy, stagger):
    """With W and P unquantized, LoQT's effective weight deq(Q) + s·P·B follows GaLore
    (proj_type "std", the same refresh steps, scale s, eps/s) step by step, across merges;
    with ``stagger`` both spread their layers' refreshes the same way."""
    s, eps, tau = 0.5, 1e-10, 4
    batches = make_batches(14)
    m1 = lo.prepare_loqt(make_model(), rank=4, scale=s, bits=None, proj_bits=None,
                         target_modules=None)
    o1 = lo.LoQTAdamW(m1.parameters(), lr=1e-2, eps=eps, update_proj_gap=tau,
                      max_proj_gap=tau, state_on_merge=policy, stagger=stagger)
    m2 = make_model()
    o2 = lo.GaLoreAdamW([{"params": [m2.emb.weight, m2.fc1.bias, m2.fc2.bias], "rank": None},
                         {"params": [m2.fc1.weight, m2.fc2.weight], "rank": 4}], lr=1e-2,
                        eps=eps / s, update_proj_gap=tau, scale=s, stagger=stagger,
                        state_on_refresh=policy)
    for b in batches:
        train(m1, o1, [b])
        train(m2, o2, [b])
        for name in ("fc1", "fc2"):
            torch.testing.assert_close(getattr(m1, name).effective_weight(),
                                       getattr(m2, name).weight, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(m1.emb.weight, m2.emb.weight, rtol=1e-4, atol=2e-5)
    assert int(m1.fc1.merges) == 4  # steps 0, 4, 8, 12: the basis changed three times


def test_plain_parameters_follow_torch_adamw():
    m1, m2 = make_model(), make_model()
    o1 = lo.LoQTAdamW(m1.parameters(), lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    batches = make_batches(6)
    train(m1, o1, batches)
    train(m2, o2, batches)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # as GaLoreAdamW(rank=None)


@pytest.mark.parametrize("policy", ["keep", "project", "reset"])
def test_state_on_merge(policy):
    """B's first moment across a merge: kept, rotated by P_oldᵀP_new, or restarted."""
    m = lo.prepare_loqt(make_model(), rank=4, bits=None, proj_bits=None, target_modules=None)
    opt = lo.LoQTAdamW(m.parameters(), lr=1e-2, update_proj_gap=3, state_on_merge=policy,
                       stagger=False)
    batches = make_batches(4)
    train(m, opt, batches[:3])  # a merge at step 0 only
    st, b = opt.state[m.fc1.B], m.fc1.B
    old, p_old = st["exp_avg"].clone(), m.fc1.projection().clone()
    loss_fn(m, batches[3]).backward()  # step 3 is due: the basis is captured here
    g = b.grad.clone()
    opt.step()
    rot = p_old.T @ m.fc1.projection()  # fc1 is tall: B·Pᵀ, moments rotate on the right
    carried = {"keep": old, "project": old @ rot, "reset": torch.zeros_like(old)}[policy]
    torch.testing.assert_close(st["exp_avg"], 0.9 * carried + 0.1 * g, rtol=1e-5, atol=1e-7)
    assert st["merge_count"] == 2
    assert (st["step"], st["merge_next"]) == ((1, 4) if policy == "reset" else (4, 7))
    assert not torch.allclose(rot.abs(), torch.eye(4), atol=1e-3)  # the basis did change


def test_merge_waits_for_a_backward_with_a_warning():
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    loss_fn(m, make_batches(1)[0]).backward()  # before the optimizer exists: not captured
    opt = lo.LoQTAdamW(m.parameters(), lr=1e-2, update_proj_gap=3, stagger=False)
    with pytest.warns(UserWarning, match="waits for the next backward pass"):
        opt.step()
    assert int(m.fc1.merges) == 0 and opt.state[m.fc1.B]["step"] == 1
    opt.zero_grad()
    train(m, opt, make_batches(1))
    assert int(m.fc1.merges) == 1 and opt.state[m.fc1.B]["merge_next"] == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(update_proj_gap=0), r"update_proj_gap: 0\b"),
    (dict(increment_size=0.5), r"increment_size: 0\.5"),
    (dict(max_proj_gap=0), r"max_proj_gap: 0\b"),
    (dict(ec_iters=-1), r"ec_iters: -1\b"),
    (dict(ec_iters=2.0), r"ec_iters: 2\.0"),
    (dict(state_on_merge="zero"), r"state_on_merge: 'zero'"),
])
def test_bad_optimizer_arguments(kwargs, match):
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    with pytest.raises(ValueError, match=match):
        lo.LoQTAdamW(m.parameters(), **kwargs)
    with pytest.raises(ValueError, match=match):  # the same in a param group
        lo.LoQTAdamW([{"params": [m.fc1.B]}, {"params": [m.fc2.B], **kwargs}])


def test_a_rank_in_a_group_is_an_error():
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    with pytest.raises(ValueError, match=r"rank: 8\b.*prepare_loqt"):
        lo.LoQTAdamW([{"params": m.parameters(), "rank": 8}])


def test_a_deep_copy_is_a_layer_of_its_own():
    """A deep copy of a LoQT model gets its own layers (the backward's capture goes to the
    copy, not to the original), and an optimizer made on the copy before any forward
    pass arms its layers: the first step merges, without a warning."""
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    copy_ = copy.deepcopy(m)
    assert copy_.fc1.B.loqt_owner is copy_.fc1 and copy_.fc1._key != m.fc1._key
    opt = lo.LoQTAdamW(copy_.parameters(), lr=1e-2, update_proj_gap=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(copy_, opt, make_batches(1))
    assert int(copy_.fc1.merges) == 1 and int(m.fc1.merges) == 0 and m.fc1._pending is None


def test_checkpoint_round_trip_weights_only():
    """Model (codes, scales, P, B, merge count) and optimizer state survive torch.save /
    torch.load(weights_only=True); the resumed run equals the uninterrupted one, across
    a merge (steps 0, 3, 7)."""
    batches = make_batches(10)
    m1 = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    o1 = lo.LoQTAdamW8bit(m1.parameters(), lr=1e-2, update_proj_gap=3, min_8bit_size=64)
    train(m1, o1, batches[:6])
    ckpt = roundtrip({"model": m1.state_dict(), "opt": o1.state_dict()})
    assert ckpt["model"]["fc1.weight_codes"].dtype == torch.uint8
    assert ckpt["opt"]["state"][1]["exp_avg_codes"].dtype == torch.uint8
    m2 = lo.prepare_loqt(make_model(seed=7), rank=4, target_modules=None)
    m2.load_state_dict(ckpt["model"])
    o2 = lo.LoQTAdamW8bit(m2.parameters(), lr=1e-2, update_proj_gap=3, min_8bit_size=64)
    o2.load_state_dict(ckpt["opt"])
    train(m1, o1, batches[6:])
    train(m2, o2, batches[6:])
    assert int(m2.fc1.merges) == 3
    for (k, v), w in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v, w), k


def test_trains_a_model():
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    opt = lo.LoQTAdamW(m.parameters(), lr=1e-2, update_proj_gap=5)
    losses = train(m, opt, make_batches(4) * 15)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(m, opt, make_batches(2))


# ---- GradScaler ------------------------------------------------------------------------


def _snapshot(m, opt) -> dict:
    """Everything a step may change: the model's tensors (Q, P, B, merge counts, ...) and
    the optimizer's state (moments, step and merge counters)."""
    snap = {f"model.{k}": v.clone() for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        snap.update({f"opt.{i}.{k}": v.clone() if torch.is_tensor(v) else v
                     for k, v in st.items()})
    return snap


def _scaled_run(device, batches, overflow=None, scaler=True, per_layer=False):
    """Training with ``torch.amp.GradScaler`` (``scale(loss).backward(); step(opt);
    update()``), normal or per-layer (``register_hooks(model, scaler=)``); the step
    ``overflow`` has an infinite loss. Snapshots: before training, then after each step.
    Merges are due at steps 0, 3, 7."""
    m = lo.prepare_loqt(make_model(), rank=4, target_modules=None)
    opt = lo.LoQTAdamW(m.parameters(), lr=1e-2, update_proj_gap=3, stagger=False)
    sc = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10) if scaler else None
    if per_layer:
        opt.register_hooks(m, scaler=sc)
    snaps = [_snapshot(m, opt)]
    for i, b in enumerate(batches):
        loss = loss_fn(m, b) * (float("inf") if i == overflow else 1.0)
        if sc is None:
            loss.backward()
            opt.step()
        else:
            sc.scale(loss).backward()
            sc.step(opt)
            sc.update()
        opt.zero_grad()
        snaps.append(_snapshot(m, opt))
    return snaps


@pytest.mark.filterwarnings("ignore:.*a global clip after backward")  # per-layer mode's
@pytest.mark.parametrize("per_layer", [False, True], ids=["normal", "per_layer"])
@pytest.mark.parametrize("at", [0, 3], ids=["first_merge", "later_merge"])
def test_grad_scaler_overflow_at_a_merge_skips_it_and_the_next_step_merges(device, at,
                                                                           per_layer):
    """An overflowing step at a merge (GradScaler skips ``opt.step()``; per-layer mode:
    the hooks skip each non-finite gradient) leaves the model (Q, P, B, merge count) and
    the optimizer's state exactly as they were, without raising; the next step merges as
    scheduled with the basis of its own gradient: the run equals one in normal mode that
    never saw the bad batch, and one without a GradScaler (the basis of a scaled gradient
    is that of the unscaled one)."""
    batches = make_batches(8)
    bad = make_batches(1, seed=5)[0]
    run = _scaled_run(device, batches[:at] + [bad] + batches[at:], overflow=at,
                      per_layer=per_layer)
    clean = _scaled_run(device, batches)
    plain = _scaled_run(device, batches, scaler=False)
    skipped, before = run[at + 1], run[at]
    assert skipped.keys() == before.keys()
    for k, v in before.items():
        assert (torch.equal(skipped[k], v) if torch.is_tensor(v) else skipped[k] == v), k
    for ref in (clean, plain):
        for t, snap in enumerate(ref):
            mine = run[t] if t <= at else run[t + 1]
            assert mine.keys() == snap.keys()
            for k, v in snap.items():
                if torch.is_tensor(v):
                    torch.testing.assert_close(mine[k], v, rtol=1e-5, atol=1e-6, msg=k)
                else:
                    assert mine[k] == v, (t, k)
    merges = lambda snaps: [int(s["model.fc1.merges"]) for s in snaps]
    assert merges(run) == merges(clean)[:at + 1] + merges(clean)[at:]  # as scheduled


def test_a_non_finite_gradient_at_an_armed_backward_is_recorded_not_raised():
    """A non-finite dense gradient in the armed backward does not raise there (a
    GradScaler's overflow); no merge takes it, and the next armed backward captures
    again (the first one since ``zero_grad``)."""
    layer = _layer((32, 48), "nf4")
    x = torch.randn(7, 32)
    layer.capture = 1
    layer(x).sum().mul(float("inf")).backward()
    assert not layer.merge_ready and not torch.isfinite(layer.B.grad).all()
    with pytest.raises(RuntimeError, match="not finite"):
        layer.merge_()
    layer.zero_grad()
    _armed_backward(layer, x)
    assert layer.merge_ready
    layer.merge_()
    assert int(layer.merges) == 2
