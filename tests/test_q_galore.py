"""Q-GaLore with integer-coded weights (QuantLinear) and its equivalences.

The optimizer's mechanics on float weights (INT4 basis, lazy refresh, 8-bit moments) run
through the common suite (``q_galore`` entries of ``registry.CONFIGS``); this file covers
what only quantized weights have: the layer, stochastic rounding, checkpoints of codes,
per-layer hooks reaching every parameter, and the degenerate configurations.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim.nn import QuantLinear
from registry import generator

pytestmark = pytest.mark.usefixtures("single_thread")


class Tiny(nn.Module):
    """embed -> attn (q, o) -> norm -> mlp -> head; attn/mlp Linear layers get quantized."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 32)
        self.attn = nn.ModuleDict({"q": nn.Linear(32, 64), "o": nn.Linear(64, 32, bias=False)})
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.SiLU(), nn.Linear(48, 32))
        self.head = nn.Linear(32, 12)

    def forward(self, tok):
        h = self.embed(tok)
        h = h + self.attn["o"](torch.tanh(self.attn["q"](h)))
        h = h + self.mlp(self.norm(h))
        return self.head(h)


def batches(n, seed=3):
    g = generator(seed)
    perm = torch.randperm(12, generator=g)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 12, (8, 6), generator=g)
        out.append((tok, perm[tok]))
    return out


def loss_of(model, b):
    tok, y = b
    return nn.functional.cross_entropy(model(tok).flatten(0, 1).float(), y.flatten())


def quantized_model(seed=0, group_size=64, dtype=torch.float32):
    torch.manual_seed(seed)
    return lo.quantize_weights(Tiny().to(dtype), bits=8, group_size=group_size)


def make_opt(model, **kw):
    kw = {**dict(lr=1e-2, rank=4, update_proj_gap=3, min_8bit_size=64, proj_group_size=32,
                 queue_size=2), **kw}
    return lo.QGaLoreAdamW8bit(model.parameters(), **kw)


def run(model, opt, data, hooks=False):
    losses = []
    for b in data:
        loss = loss_of(model, b)
        loss.backward()
        if not hooks:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


def codes(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- the layer ---------------------------------------------------------------------------

def test_quantize_weights_swaps_only_targets_and_keeps_no_float_copy():
    m = quantized_model()
    assert isinstance(m.attn["q"], QuantLinear) and isinstance(m.mlp[2], QuantLinear)
    assert type(m.head) is nn.Linear and type(m.embed) is nn.Embedding
    sd = m.state_dict()
    assert sd["attn.q.weight"].dtype == torch.uint8
    assert sd["attn.q.weight_scale"].dtype == torch.float32
    # no floating tensor of the weight's size stored anywhere in the layer: the weight
    # holds uint8 codes and per-group scales only
    layer = m.attn["q"]
    w = layer.weight
    stored = [getattr(w, k) for k in w.__tensor_flatten__()[0]] + [layer.bias]
    stored += list(layer.buffers())
    assert w.codes.dtype == torch.uint8
    assert all(t.numel() < w.numel() for t in stored if t.is_floating_point())


def test_quant_linear_forward_and_gradients_match_the_dequantized_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    q = QuantLinear.from_linear(lin, bits=8, group_size=32)
    ref = nn.Linear(24, 40)
    ref.weight.data.copy_(q.dequantized_weight())
    ref.bias.data.copy_(q.bias.data)
    x1 = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    torch.testing.assert_close(q(x1), ref(x2))
    (q(x1) ** 2).sum().backward()
    (ref(x2) ** 2).sum().backward()
    assert type(q.weight.grad) is torch.Tensor and q.weight.grad.dtype == torch.float32
    torch.testing.assert_close(q.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)
    # a second backward accumulates, as .grad does
    g1 = q.weight.grad.clone()
    (q(x1) ** 2).sum().backward()
    torch.testing.assert_close(q.weight.grad, 2 * g1)


def test_quant_linear_round_trip_error_and_model_to_bf16_keeps_float32_scales():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, bits=8, group_size=256)
    err = (q.dequantized_weight() - lin.weight).abs().max()
    assert err <= q.weight_scale.max() / 2 + 1e-7
    q.to(torch.bfloat16)
    assert q.weight.codes.dtype == torch.uint8 and q.weight_scale.dtype == torch.float32
    assert q.weight.dtype == torch.float32  # what autograd sees: float32 gradients
    assert q.bias.dtype == torch.bfloat16


def test_quantize_weights_errors():
    with pytest.raises(ValueError, match="nothing|No nn.Linear"):
        lo.quantize_weights(nn.Sequential(nn.Linear(4, 4)), target_modules=("attn",))
    with pytest.raises(ValueError, match=r"bits: 9\b"):
        lo.quantize_weights(Tiny(), bits=9)
    with pytest.raises(ValueError, match=r"group_size: 0\b"):
        lo.quantize_weights(Tiny(), group_size=0)
    with pytest.raises(TypeError, match="not a string"):
        lo.quantize_weights(Tiny(), target_modules="attn")


# ---- stochastic rounding -------------------------------------------------------------------

def test_stochastic_rounding_keeps_sub_step_updates_on_average():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 16), bits=8, group_size=256)
    w0 = q.dequantized_weight()
    step = q.weight_scale.max().item()
    delta = 0.1 * step * torch.sign(torch.randn_like(w0))  # a tenth of a quantization step
    trials = 400
    total_sr = torch.zeros_like(w0)
    total_rtn = torch.zeros_like(w0)
    for i in range(trials):
        for stochastic, total in ((True, total_sr), (False, total_rtn)):
            layer = copy.deepcopy(q)
            layer.weight.requantize_(w0 + delta, stochastic=stochastic,
                                     generator=generator(i))
            total += layer.dequantized_weight()
    mean_sr, mean_rtn = total_sr / trials, total_rtn / trials
    # round-to-nearest loses the update; SR keeps it within a few standard errors
    moved_rtn = ((mean_rtn - w0) * torch.sign(delta)).mean() / delta.abs().mean()
    moved_sr = ((mean_sr - w0) * torch.sign(delta)).mean() / delta.abs().mean()
    assert moved_rtn.abs() < 0.3
    assert abs(moved_sr - 1) < 0.1
    se = step / trials ** 0.5
    assert ((mean_sr - (w0 + delta)).abs() < 6 * se).float().mean() > 0.99


def test_optimizer_step_on_int8_weights_is_unbiased():
    """Many one-step runs from the same point with different rounding noise: the mean
    dequantized weight equals the float update (what GaLore would give), not RTN's."""
    torch.manual_seed(0)
    base = quantized_model()
    data = batches(1)
    finals = []
    for seed in range(200):
        m = copy.deepcopy(base)
        # each run differs only in the seed of the rounding noise
        opt = make_opt(m, lr=2e-3, min_8bit_size=10**9, seed=seed)
        loss_of(m, data[0]).backward()
        layer = m.attn["q"]
        w_before = layer.dequantized_weight()
        opt.step()
        finals.append(layer.dequantized_weight() - w_before)
    mean_delta = torch.stack(finals).mean(0)
    # the float update of this step: same optimizer on a float copy of the same layer
    ref = copy.deepcopy(base)
    for name in ("q", "o"):
        ql = ref.attn[name]
        fl = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None)
        fl.weight.data.copy_(ql.dequantized_weight())
        if ql.bias is not None:
            fl.bias.data.copy_(ql.bias.data)
        ref.attn[name] = fl
    for i in (0, 2):
        ql = ref.mlp[i]
        fl = nn.Linear(ql.in_features, ql.out_features)
        fl.weight.data.copy_(ql.dequantized_weight())
        fl.bias.data.copy_(ql.bias.data)
        ref.mlp[i] = fl
    w0 = ref.attn["q"].weight.detach().clone()
    opt = make_opt(ref, lr=2e-3, min_8bit_size=10**9)
    loss_of(ref, data[0]).backward()
    opt.step()
    expected = ref.attn["q"].weight.detach() - w0
    step = base.attn["q"].weight_scale.max()
    assert expected.abs().max() < step  # the update is smaller than one code step
    cos = nn.functional.cosine_similarity(mean_delta.flatten(), expected.flatten(), dim=0)
    print(f"cos {cos:.3f}, norm ratio {mean_delta.norm() / expected.norm():.3f}, "
          f"update/step {expected.abs().max() / step:.3f}")
    assert cos > 0.9
    assert abs(mean_delta.norm() / expected.norm() - 1) < 0.25


# ---- training, modes, checkpoints -----------------------------------------------------------

def test_trains_and_updates_every_parameter_in_hooks_mode():
    m1, m2 = quantized_model(), quantized_model()
    o1, o2 = make_opt(m1), make_opt(m2)
    data = batches(30)
    before = codes(m2)
    l1 = run(m1, o1, data)
    with o2.register_hooks(m2):
        l2 = run(m2, o2, data, hooks=True)
    assert l1 == l2
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    after = codes(m2)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # every parameter and every code tensor moved: embeddings, norms, head included
    for name, _ in m2.named_parameters():
        assert name in changed, name
    assert sum(l1[-5:]) < 0.8 * sum(l1[:5])
    assert all(p.grad is None for p in m2.parameters())


def test_int8_weight_gradient_is_an_ordinary_grad():
    """Autograd accumulates it, zero_grad clears it, step leaves it (as torch.optim)."""
    m = quantized_model()
    opt = make_opt(m)
    w = m.attn["q"].weight
    assert isinstance(w, nn.Parameter) and w.requires_grad and w.is_leaf
    loss_of(m, batches(1)[0]).backward()
    assert type(w.grad) is torch.Tensor and w.grad.shape == w.shape
    opt.zero_grad()
    assert w.grad is None
    loss_of(m, batches(1)[0]).backward()
    g = w.grad.clone()
    opt.step()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_checkpoint_round_trip_is_bit_identical(dtype):
    data = batches(16)
    m1 = quantized_model(dtype=dtype)
    o1 = make_opt(m1)
    run(m1, o1, data[:6])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["model"]["attn.q.weight"].dtype == torch.uint8
    m2 = quantized_model(seed=5, dtype=dtype)
    m2.load_state_dict(ckpt["model"])
    o2 = make_opt(m2)
    o2.load_state_dict(ckpt["opt"])
    st = o2.state[m2.attn["q"].weight]
    assert st["proj_codes"].dtype == torch.uint8 and st["exp_avg_codes"].dtype == torch.uint8
    assert st["proj_scale"].dtype == torch.float32
    run(m1, o1, data[6:])
    run(m2, o2, data[6:])
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_equals_galore_with_quantization_and_laziness_off():
    """Float weights, proj_bits=None, gamma_proj=1, no 8-bit moments: GaLoreAdamW."""
    torch.manual_seed(0)
    m1 = Tiny()
    m2 = copy.deepcopy(m1)
    kw = dict(lr=1e-2, rank=4, update_proj_gap=3)
    o1 = lo.QGaLoreAdamW8bit(m1.parameters(), proj_bits=None, gamma_proj=1,
                             min_8bit_size=10**9, **kw)
    o2 = lo.GaLoreAdamW(m2.parameters(), **kw)
    data = batches(12)
    assert run(m1, o1, data) == run(m2, o2, data)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_laziness_lowers_the_number_of_svds_when_the_subspace_settles():
    """A linear least-squares problem with a fixed low-rank target: its gradients keep
    one subspace, so lazy refresh widens the gaps; the loss reached is the same."""
    torch.manual_seed(0)
    target = torch.randn(48, 3) @ torch.randn(3, 32)
    x = torch.randn(256, 32)

    def train(gamma):
        lin = nn.Linear(32, 48, bias=False)
        nn.init.zeros_(lin.weight)
        opt = lo.QGaLoreAdamW8bit([lin.weight], lr=2e-2, rank=3, update_proj_gap=4,
                                  gamma_proj=gamma, queue_size=3, proj_bits=None,
                                  stagger=False, scale=1.0)
        for _ in range(200):
            loss = (x @ lin.weight.T - x @ target.T).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return opt.state[lin.weight]["refresh_count"], loss.item()

    svds_fixed, loss_fixed = train(1)
    svds_lazy, loss_lazy = train(2)
    assert svds_fixed == 50
    assert svds_lazy <= 0.5 * svds_fixed
    assert loss_lazy <= 1.05 * loss_fixed + 1e-6


def test_quantized_weight_bits_other_than_8():
    torch.manual_seed(0)
    m = lo.quantize_weights(Tiny(), bits=4, group_size=32)
    opt = make_opt(m)
    losses = run(m, opt, batches(30))
    assert sum(losses[-5:]) < sum(losses[:5])
    w = m.attn["q"].weight
    assert w.shape == (64, 32) and w.codes.dtype == torch.uint8 and int(w.codes.max()) <= 15


def test_param_groups_selects_quantized_layers():
    m = quantized_model()
    groups = lo.param_groups(m, rank=4, target_modules=("attn", "mlp"))
    projected = groups[-1]["params"]
    assert {id(p) for p in projected} == {id(m.attn["q"].weight), id(m.attn["o"].weight),
                                         id(m.mlp[0].weight), id(m.mlp[2].weight)}
    assert all(p.is_floating_point() for p in groups[0]["params"])
    opt = lo.QGaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=64, proj_group_size=32)
    losses = run(m, opt, batches(20))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert opt.basis(m.embed.weight) is None and opt.basis(m.attn["q"].weight) is not None


# ---- INT8 weights are ordinary parameters to the rest of PyTorch --------------------------

def float_twin(model):
    """The same model with every QuantLinear replaced by an nn.Linear holding its
    dequantized weight: what clipping, scaling and DDP must treat the INT8 model like."""
    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, QuantLinear):
            fl = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            fl.weight.data.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                fl.bias.data.copy_(layer.bias.data)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, fl)
    return twin


def test_clip_grad_norm_sees_int8_weights_as_float_weights():
    m = quantized_model()
    f = float_twin(m)
    b = batches(1)[0]
    for model in (m, f):
        loss_of(model, b).backward()
    norm_q = torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    norm_f = torch.nn.utils.clip_grad_norm_(f.parameters(), 1e-3)
    torch.testing.assert_close(norm_q, norm_f, rtol=1e-5, atol=0)
    grads = [p.grad for p in m.parameters()]
    assert len(grads) == len(list(f.parameters())) and all(g is not None for g in grads)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)
    for (name, pq), pf in zip(m.named_parameters(), f.parameters()):
        torch.testing.assert_close(pq.grad, pf.grad, rtol=1e-4, atol=1e-9, msg=name)


def test_grad_scaler_unscales_int8_gradients_and_a_skipped_step_keeps_codes():
    data = batches(4)
    m_ref, m = quantized_model(), quantized_model()
    o_ref, o = make_opt(m_ref), make_opt(m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=1000)
    for i, b in enumerate(data):
        loss_of(m_ref, b).backward()
        o_ref.step()
        scaler.scale(loss_of(m, b)).backward()
        scaler.unscale_(o)
        w = m.attn["q"].weight
        # the optimizer receives the unscaled gradient, exactly (a power-of-two scale)
        torch.testing.assert_close(w.grad, m_ref.attn["q"].weight.grad, rtol=0, atol=0)
        scaler.step(o)
        scaler.update()
        o_ref.zero_grad()
        o.zero_grad()
    for k, v in m_ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    # an overflow in an INT8 weight's gradient: the step is skipped, no code moves
    before = codes(m)
    scaler.scale(loss_of(m, data[0])).backward()
    m.attn["q"].weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(o)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for k, v in before.items():
        assert torch.equal(v, m.state_dict()[k]), k


class Twice(nn.Module):
    """One QuantLinear applied twice in a forward (weight tying, a shared block)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize("hooks", [False, True], ids=["step", "hooks"])
def test_quant_linear_used_twice_is_stepped_once_with_the_summed_gradient(hooks):
    torch.manual_seed(0)
    m = lo.quantize_weights(Twice(), bits=8, group_size=64, target_modules=("lin",))
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    # the summed gradient: the float twin's autograd sums both uses
    f = float_twin(m)
    nn.functional.mse_loss(f(x), y).backward()
    nn.functional.mse_loss(m(x), y).backward()
    torch.testing.assert_close(m.lin.weight.grad, f.lin.weight.grad, rtol=1e-4, atol=1e-7)
    m.zero_grad()
    ref = copy.deepcopy(m)
    o_ref = lo.QGaLoreAdamW8bit(ref.parameters(), lr=1e-2, rank=4, update_proj_gap=2,
                                min_8bit_size=64)
    opt = lo.QGaLoreAdamW8bit(m.parameters(), lr=1e-2, rank=4, update_proj_gap=2,
                              min_8bit_size=64)
    calls = []
    step_param = opt.step_param
    opt.step_param = lambda p, group: (calls.append(p), step_param(p, group))
    handle = opt.register_hooks(m) if hooks else None
    for _ in range(3):
        nn.functional.mse_loss(ref(x), y).backward()
        o_ref.step()
        o_ref.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        if not hooks:
            opt.step()
            opt.zero_grad()
    assert sum(p is m.lin.weight for p in calls) == 3  # once per backward
    assert opt.state[m.lin.weight]["step"] == 3
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    if handle is not None:
        handle.remove()
