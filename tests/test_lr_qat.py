"""Tests of lowrank_optim.lr_qat: the LR-QAT layer (init = round-to-nearest, STE gradients,
memory of the autograd graph), its param groups, integer export, storage and errors."""
import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

import lowrank_optim as lo
from lowrank_optim import quant
from lowrank_optim.lr_qat import (IntLinear, LRQATLinear, downcast, export_lr_qat, init_scale,
                                  lr_qat_param_groups, prepare_lr_qat)
from registry import generator

pytestmark = pytest.mark.usefixtures("single_thread")

LAYOUTS = [  # (bits, group_size, storage)
    (4, None, "int8"), (4, 16, "int8"), (4, None, "int4x2"), (4, 16, "int4x2"),
    (3, None, "int8"), (3, 32, "int4x2"), (2, 16, "int8"), (8, None, "int8"),
]


class Toy(nn.Module):
    """Two target layers (``attn``, ``mlp``) and an untargeted ``head``."""

    def __init__(self, d=64, h=96, bias=True):
        super().__init__()
        self.attn, self.mlp = nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        return self.head(self.mlp(torch.relu(self.attn(x))))


def _rtn(w, scale, bits, group):
    """Round-to-nearest symmetric quantization of ``w`` with the given scales."""
    out, inp = w.shape
    lo_, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    s = scale[..., None]
    return (torch.round(w.float().view(out, -1, group) / s).clamp(lo_, hi) * s).view(out, inp)


def _z(layer, A, B):
    """Phi_0 (upcast) + (alpha/r) A B, with plain ops."""
    spec = layer.spec
    if spec.packed:
        base = quant.unpack_nibbles(layer.phi0, spec.in_features * spec.out_features).view(
            spec.out_features, -1).float() - 2 ** (spec.bits - 1)
    else:
        base = layer.phi0.float() / 2 ** spec.frac_bits
    return base + spec.c * A @ B


def _reference_forward(layer, x, A, B, s):
    """The LR-QAT forward with plain autograd ops (STE written as z + (round(z) - z))."""
    spec = layer.spec
    z = _z(layer, A, B)
    n = (z + (torch.round(z) - z).detach()).clamp(-2 ** (spec.bits - 1), 2 ** (spec.bits - 1) - 1)
    w = (n.view(spec.out_features, -1, spec.group) * s[..., None]).view(n.shape)
    return F.linear(x, w, layer.bias)


@pytest.mark.parametrize("bits,group,storage", LAYOUTS)
def test_init_forward_equals_round_to_nearest(bits, group, storage):
    lin = nn.Linear(64, 48)
    layer = LRQATLinear.from_linear(lin, bits=bits, rank=8, group_size=group, storage=storage)
    assert torch.equal(layer.scale, init_scale(lin.weight, bits, group))
    x = torch.randn(7, 64)
    w_rtn = _rtn(lin.weight.detach(), layer.scale.detach(), bits, group or 64)
    assert torch.equal(layer(x), F.linear(x, w_rtn, lin.bias))
    assert torch.equal(layer.quantized_weight(), w_rtn)


def test_range_search_beats_absmax():
    w = torch.randn(32, 128) * torch.rand(32, 1)
    s = init_scale(w, 3)
    absmax = w.abs().amax(1, keepdim=True) / 3
    err = lambda sc: (_rtn(w, sc, 3, 128) - w).square().sum(1)
    assert (err(s) <= err(absmax)).all() and err(s).sum() < 0.9 * err(absmax).sum()
    assert torch.equal(init_scale(torch.zeros(4, 8), 4), torch.ones(4, 1))


@given(bits=st.integers(2, 8), seed=st.integers(0, 2 ** 16), group=st.sampled_from([None, 8]))
def test_fixed_point_keeps_code_and_fraction(bits, seed, group):
    """int8 Phi_0: its rounding is the RTN code, and it is within 2^-F of W/s (F = 8 - bits)."""
    w = torch.randn(6, 16, generator=generator(seed))
    s = init_scale(w, bits, group)
    phi = downcast(w, s, bits, group)
    assert phi.dtype == torch.int8
    fb = 8 - bits
    x = (w.view(6, -1, group or 16) / s[..., None]).clamp(-2 ** (bits - 1),
                                                          2 ** (bits - 1) - 1).view(6, 16)
    up = phi.float() / 2 ** fb
    assert torch.equal(torch.round(up), torch.round(x))
    assert (up - x).abs().max() <= (2.0 ** -fb if fb else 0.5)


@pytest.mark.parametrize("bits,group,storage", [(4, None, "int8"), (3, 16, "int4x2")])
def test_gradients_match_straight_through_reference(bits, group, storage):
    layer = LRQATLinear.from_linear(nn.Linear(64, 48), bits=bits, rank=8, group_size=group,
                                    storage=storage)
    with torch.no_grad():
        layer.A.normal_(0, 100.0)  # move values across boundaries and out of the grid
    x = torch.randn(2, 5, 64, requires_grad=True)
    gy = torch.randn(2, 5, 48)
    layer(x).backward(gy)
    got = [t.grad.clone() for t in (x, layer.A, layer.B, layer.scale, layer.bias)]
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.A, layer.B, layer.scale)]
    layer.bias = bias = nn.Parameter(layer.bias.detach().clone())
    _reference_forward(layer, *leaves).backward(gy)
    for g, ref in zip(got, leaves + [bias]):
        torch.testing.assert_close(g, ref.grad, rtol=1e-5, atol=1e-5)
    z = _z(layer, layer.A, layer.B).round()
    outside = (z < -2 ** (bits - 1)) | (z > 2 ** (bits - 1) - 1)
    assert 0.05 < outside.float().mean() < 0.5  # the clamp mask is exercised
    assert "phi0" in dict(layer.named_buffers()) and not layer.phi0.requires_grad
    assert set(dict(layer.named_parameters())) == {"A", "B", "scale", "bias"}


def test_adamw_training_reduces_loss():
    teacher = Toy()
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prepare_lr_qat(model, bits=3, rank=8, group_size=16)
    model.head.requires_grad_(False)
    opt = torch.optim.AdamW(lr_qat_param_groups(model, lr=3e-2, scale_lr=1e-3))
    x = torch.randn(256, 64)
    y = teacher(x).detach()
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
    assert model.attn.A.abs().sum() > 0


def test_param_groups():
    model = prepare_lr_qat(Toy())
    groups = lr_qat_param_groups(model, lr=1e-3, scale_lr=1e-5, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [4, 2, 4]  # A,B x2; scales; biases + head
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1e-5, 0.0),
                                                              (1e-3, 0.1)]
    assert groups[1]["params"] == [model.attn.scale, model.mlp.scale]
    model.requires_grad_(False)
    model.attn.A.requires_grad_(True)
    assert [len(g["params"]) for g in lr_qat_param_groups(model)] == [1]
    # this package's optimizers step the groups as plain AdamW (no projection)
    model = prepare_lr_qat(Toy())
    opt = lo.GaLoreAdamW(lr_qat_param_groups(model), lr=1e-3, rank=4)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    assert all("proj_side" not in s for s in opt.state.values()) and opt.state
    with pytest.raises(ValueError, match="no LRQATLinear"):
        lr_qat_param_groups(Toy())


@pytest.mark.parametrize("bits,group,storage", [(4, None, "int8"), (3, 32, "int4x2"),
                                                (6, 16, "int8")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_equals_trained_forward(bits, group, storage, dtype):
    model = prepare_lr_qat(Toy(), bits=bits, rank=8, group_size=group, storage=storage)
    model.to(dtype)
    codes0 = model.attn.int_weight()
    with torch.no_grad():
        model.attn.A.normal_(0, 50.0)  # as after some training
    opt = torch.optim.AdamW(lr_qat_param_groups(model, lr=1e-2, scale_lr=1e-3))
    for _ in range(3):
        model(torch.randn(16, 64, dtype=dtype)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    exported = export_lr_qat(copy.deepcopy(model))
    assert isinstance(exported.attn, IntLinear) and isinstance(exported.mlp, IntLinear)
    assert not any(isinstance(m, LRQATLinear) for m in exported.modules())
    assert not any(n.endswith((".A", ".B")) for n, _ in exported.named_parameters())
    x = torch.randn(2, 9, 64, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
    assert torch.equal(exported.attn.int_weight(), model.attn.int_weight())
    assert (model.attn.int_weight() != codes0).any()  # training moved codes


@pytest.mark.parametrize("bits,storage,shape", [(4, "int8", (48, 64)), (4, "int4x2", (5, 3)),
                                                (3, "int4x2", (48, 64)), (7, "int8", (5, 3))])
def test_storage_dtypes_and_bytes(bits, storage, shape):
    out, inp = shape
    layer = LRQATLinear.from_linear(nn.Linear(inp, out), bits=bits, rank=2, storage=storage)
    nbytes = lambda t: t.numel() * t.element_size()
    if storage == "int8":
        assert layer.phi0.dtype == torch.int8 and nbytes(layer.phi0) == out * inp
    else:
        assert layer.phi0.dtype == torch.uint8 and nbytes(layer.phi0) == (out * inp + 1) // 2
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (out, 1)
    assert (layer.A.shape, layer.B.shape) == ((out, 2), (2, inp))
    exported = layer.to_int_linear()
    assert exported.codes.dtype == torch.uint8
    assert nbytes(exported.codes) == ((out * inp + 1) // 2 if bits <= 4 else out * inp)
    layer.to(torch.bfloat16)
    exported.to(torch.bfloat16)
    assert layer.A.dtype == layer.B.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.scale.dtype == exported.scale.dtype == torch.float32
    assert layer.phi0.dtype == (torch.int8 if storage == "int8" else torch.uint8)


BAD = [
    (dict(bits=1), "Invalid bits: 1 (expected an int from 2 to 8)"),
    (dict(bits=9), "Invalid bits: 9"), (dict(bits=4.0), "Invalid bits: 4.0"),
    (dict(rank=0), "Invalid rank: 0 (expected an int from 1 to min(in_features, out_features) = 64)"),
    (dict(rank=65), "Invalid rank: 65"), (dict(rank=True), "Invalid rank: True"),
    (dict(group_size=0), "Invalid group_size: 0"),
    (dict(group_size=48), "Invalid group_size: 48 (expected None for one scale per output "
                          "channel, or a positive int dividing in_features = 64)"),
    (dict(storage="int4"), "Invalid storage: 'int4' (expected one of ('int8', 'int4x2'))"),
    (dict(storage="int4x2", bits=5), "Invalid storage 'int4x2' for bits=5"),
    (dict(alpha=0.0), "Invalid alpha: 0.0"), (dict(alpha=float("nan")), "Invalid alpha: nan"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LRQATLinear(64, 96, **kwargs)
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape("Linear(64 -> 96): " + message)):
        prepare_lr_qat(model, **kwargs)
    assert isinstance(model.attn, nn.Linear) and all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_target_and_no_layer_errors():
    with pytest.raises(ValueError, match="No nn.Linear module name contains any of"):
        prepare_lr_qat(Toy(), target_modules=("nothing",))
    with pytest.raises(TypeError, match="not a string"):
        prepare_lr_qat(Toy(), target_modules="attn")
    with pytest.raises(ValueError, match="no LRQATLinear"):
        export_lr_qat(Toy())


def test_prepare_keeps_other_params_as_they_were():
    model = Toy()
    model.mlp.bias.requires_grad_(False)
    prepare_lr_qat(model)
    assert isinstance(model.attn, LRQATLinear) and type(model.head) is nn.Linear
    assert model.attn.bias.requires_grad and not model.mlp.bias.requires_grad
    assert model.head.weight.requires_grad
    assert not any(n.endswith("weight") and "head" not in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("storage", ["int8", "int4x2"])
def test_state_dict_round_trip(storage):
    model = prepare_lr_qat(Toy(), bits=4, rank=4, group_size=16, storage=storage)
    with torch.no_grad():
        model.attn.A.normal_()
        model.mlp.scale.mul_(1.1)
    model.to(torch.bfloat16)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = prepare_lr_qat(Toy(), bits=4, rank=4, group_size=16, storage=storage)
    fresh.to(torch.bfloat16)
    fresh.load_state_dict(state)
    assert fresh.mlp.scale.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    exported = export_lr_qat(model)
    buf = io.BytesIO()
    torch.save(exported.state_dict(), buf)
    buf.seek(0)
    target = export_lr_qat(fresh)
    target.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(target(x), exported(x))


def _graph_bytes(module, x):
    """Bytes of tensors that module(x)'s autograd graph saves and that did not exist
    before (not x, nor a parameter or buffer), and the largest one's numel."""
    held = {t.untyped_storage().data_ptr() for t in [x, *module.parameters(), *module.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = module(x)
    new = {t.untyped_storage().data_ptr(): t for t in saved
           if t.untyped_storage().data_ptr() not in held}
    return y, sum(t.untyped_storage().nbytes() for t in new.values()), \
        max((t.numel() for t in new.values()), default=0)


class _DenseQAT(nn.Module):
    """Full QAT: a trainable dense weight, fake-quantized by round-STE with learnable
    per-channel scales, in plain autograd."""

    def __init__(self, linear, bits=4):
        super().__init__()
        self.weight, self.bias = nn.Parameter(linear.weight.detach().clone()), linear.bias
        self.scale = nn.Parameter(init_scale(linear.weight, bits))
        self.lo, self.hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1

    def forward(self, x):
        z = self.weight / self.scale
        n = (z + (torch.round(z) - z).detach()).clamp(self.lo, self.hi)
        return F.linear(x, n * self.scale, self.bias)


def test_autograd_graph_holds_no_dense_weight():
    lin = nn.Linear(256, 192)
    x = torch.randn(4, 256, requires_grad=True)
    layer = LRQATLinear.from_linear(lin, bits=4, rank=16)
    y, new_bytes, biggest = _graph_bytes(layer, x)
    assert new_bytes == 0 and biggest == 0  # saves only x, A, B, s and phi0
    y.sum().backward()
    assert layer.A.grad is not None and layer.scale.grad is not None
    _, dense_bytes, dense_biggest = _graph_bytes(_DenseQAT(lin), x)
    assert dense_biggest == 256 * 192 and dense_bytes >= 2 * 4 * 256 * 192
