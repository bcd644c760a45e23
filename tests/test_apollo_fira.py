"""APOLLO, APOLLO-Mini and Fira: their math against hand-written formulas.

The contract (resume, weights_only, hooks, bf16, errors) comes from the registry's
``apollo*`` and ``fira*`` entries; here: APOLLO's scaling factors and Fira's scaled
residual computed in float64 from the papers' formulas, the norm-growth limiter, the
reseeded random projection, and APOLLO-Mini's state on the LLaMA-60M matrices.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim.fira import limit_growth
from registry import generator, roundtrip

pytestmark = pytest.mark.usefixtures("single_thread")

B1, B2, EPS = 0.9, 0.999, 1e-8


def _grads(shape, n, seed=0, scale=1.0):
    gen = generator(seed)
    return [scale * torch.randn(shape, generator=gen) for _ in range(n)]


def _adam(state, low, t):
    """The low-rank Adam direction (GaLore's ε placement), float64, updating ``state``."""
    state["m"] = B1 * state.get("m", 0) + (1 - B1) * low
    state["v"] = B2 * state.get("v", 0) + (1 - B2) * low * low
    return math.sqrt(1 - B2 ** t) / (1 - B1 ** t) * state["m"] / (state["v"].sqrt() + EPS)


def _ratio(d, low, dim):
    """||d_j|| / (||R_j|| + 1e-8) over channels along ``dim`` (None: the whole tensor)."""
    if dim is None:
        return d.norm() / (low.norm() + 1e-8)
    return d.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)


# ---- APOLLO --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)], ids=["left", "right"])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_apollo_update_is_the_papers_formula(shape, scale_type):
    """W_t = W_{t-1} − lr·α·G_t·diag(s), s_j = ||R̃[:, j]|| / ||R[:, j]||, R = PᵀG (left) or
    GP (right; channels are rows), R̃ = Adam(R), with the optimizer's own P."""
    lr, alpha = 0.1, 2.0
    w = nn.Parameter(torch.randn(shape, generator=generator(1)))
    opt = lo.APOLLOAdamW([w], lr=lr, rank=3, scale=alpha, scale_type=scale_type,
                         update_proj_gap=2, norm_growth_limit=None, state_on_refresh="reset")
    want, st, left = w.detach().double().clone(), {}, shape[0] < shape[1]
    for t, g in enumerate(_grads(shape, 4), 1):
        w.grad = g.clone()
        opt.step()
        if t == 3:  # a new projection at step 3 (gap 2), and "reset" zeroed the moments
            st = {}
        p, g = opt.basis(w).double(), g.double()
        assert p.shape == (shape[0] if left else shape[1], 3)
        low = p.T @ g if left else g @ p
        d = _adam(st, low, 1 + (t - 1) % 2)
        s = _ratio(d, low, (0 if left else 1) if scale_type == "channel" else None)
        want -= lr * alpha * g * s
        torch.testing.assert_close(w.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_apollo_projection_is_reseeded_reproducibly():
    """P is a Gaussian N(0, 1/r) drawn from (seed, refresh count): the same for every
    optimizer with the same seed whatever the gradients or the global RNG, new exactly at
    steps 0, T, 2T, ..., another with another seed, and the same after a resume."""
    shape, gap = (12, 20), 3
    ws = [nn.Parameter(torch.zeros(shape)) for _ in range(4)]
    opts = [lo.APOLLOAdamW([w], rank=4, update_proj_gap=gap, seed=s)
            for w, s in zip(ws, (0, 0, 1, 0))]
    bases = []
    for t in range(8):
        torch.manual_seed(t)  # the global RNG changes between optimizers: it is not used
        for k, (w, opt) in enumerate(zip(ws, opts)):
            if k < 3 or t > 4:  # the 4th resumes the 1st from its step-4 checkpoint
                w.grad = _grads(shape, 1, seed=10 * t + k % 3)[0]
                opt.step()
        bases.append([opt.basis(w) for w, opt in zip(ws[:3], opts[:3])])
        if t == 4:
            opts[3].load_state_dict(roundtrip(opts[0].state_dict()))
        if t >= 4:
            assert torch.equal(opts[3].basis(ws[3]), bases[t][0])
    for t, (a, b, c) in enumerate(bases):
        assert torch.equal(a, b) and not torch.equal(a, c)
        if t:
            assert torch.equal(a, bases[t - 1][0]) == (t % gap != 0), t
    big = nn.Parameter(torch.zeros(300, 400))
    opt = lo.APOLLOAdamW([big], rank=16)
    big.grad = torch.ones(300, 400)
    opt.step()
    p = opt.basis(big)
    assert p.shape == (300, 16) and abs(p.mean()) < 0.01
    assert abs(p.std() * math.sqrt(16) - 1) < 0.05  # entries of variance 1/r


# ---- Fira ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)], ids=["left", "right"])
def test_fira_is_galore_plus_the_scaled_residual(shape):
    """Fed the same gradients, Fira's step minus GaLore's is −lr·(G − PPᵀG)·diag(φ),
    φ_j = ||N[:, j]|| / ||R[:, j]|| (channels: columns of an r×n R, rows of an m×r R)."""
    lr = 0.1
    w0 = torch.randn(shape, generator=generator(1))
    wf, wg = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(lr=lr, rank=3, scale=0.5, update_proj_gap=10)
    fira = lo.FiraAdamW([wf], norm_growth_limit=None, **kw)
    galore = lo.GaLoreAdamW([wg], **kw)
    diff, st, left = torch.zeros(shape, dtype=torch.float64), {}, shape[0] < shape[1]
    for t, g in enumerate(_grads(shape, 3), 1):
        wf.grad, wg.grad = g.clone(), g.clone()
        fira.step()
        galore.step()
        p, g = fira.basis(wf).double(), g.double()
        torch.testing.assert_close(p, galore.basis(wg).double())
        low = p.T @ g if left else g @ p
        residual = g - (p @ low if left else low @ p.T)
        diff -= lr * residual * _ratio(_adam(st, low, t), low, 0 if left else 1)
        torch.testing.assert_close((wf - wg).detach().double(), diff, rtol=1e-4, atol=1e-6)
        assert residual.norm() > 0.1 * g.norm()  # the residual is not negligible here


# ---- the norm-growth limiter ---------------------------------------------------------


def test_limit_growth_formula():
    st = {}
    norms = [2.0, 3.0, 1.0, 0.0, 5.0, 5.0]
    # no limit first; 3 > 1.01·2; 1 is below; 0 is below; after a zero update no limit
    want_c = [1.0, 1.01 * 2 / 3, 1.0, 1.0, 1.0, 1.0]
    for n, c in zip(norms, want_c):
        got = limit_growth(st, torch.tensor(n), 1.01)
        assert math.isclose(got.item(), c, rel_tol=1e-6) and got.dim() == 0
        assert math.isclose(st["limiter_norm"].item(), n * c, rel_tol=1e-6)
    assert limit_growth({"limiter_norm": torch.tensor(1.0)}, torch.tensor(9.0), None) == 1.0


@pytest.mark.parametrize("cls", [lo.APOLLOAdamW, lo.APOLLOMini, lo.FiraAdamW],
                         ids=lambda c: c.__name__)
def test_limiter_caps_the_growth_of_the_scaled_update(cls):
    """With γ = 1.01 the norm of the scaled update (APOLLO: G·diag(s); Fira: the scaled
    residual) grows at most 1% a step, its value is the one applied (APOLLO: the step
    is −lr·α·that), and without the limiter the same gradients grow it by more."""
    shape, lr = (10, 24), 0.05
    grads = [g * 1.5 ** t for t, g in enumerate(_grads(shape, 12))]
    runs = {}
    for gamma in (1.01, None):
        w = nn.Parameter(torch.zeros(shape))
        opt = cls([w], lr=lr, rank=3, norm_growth_limit=gamma, update_proj_gap=5)
        norms = []
        for g in grads:
            before = w.detach().clone()
            w.grad = g.clone()
            opt.step()
            norms.append(opt.state[w]["limiter_norm"].item())
            if cls is not lo.FiraAdamW:
                step = (w.detach() - before).norm().item() / (lr * opt.param_groups[0]["scale"])
                assert math.isclose(step, norms[-1], rel_tol=1e-4)
        runs[gamma] = [b / a for a, b in zip(norms, norms[1:])]
    assert max(runs[1.01]) <= 1.01 * (1 + 1e-6)
    assert max(runs[None]) > 1.1


# ---- memory --------------------------------------------------------------------------

# LLaMA-60M as benchmarks/common.py builds it (hidden 512, intermediate 1376, 8 layers):
# per layer q, k, v, o (512×512), gate and up (1376×512), down (512×1376)
LLAMA_60M_MATRICES = [(512, 512)] * 4 * 8 + [(1376, 512)] * 2 * 8 + [(512, 1376)] * 8


def apollo_state_bytes(shape, rank: int) -> int:
    """Closed form: two float32 moments of r·max(m, n) ("std" side) and the limiter's
    float; the random projection is not stored."""
    m, n = shape
    return 4 * (2 * min(rank, m, n) * max(m, n) + 1)


def adamw_state_bytes(shape) -> int:
    m, n = shape
    return 4 * 2 * m * n  # exp_avg and exp_avg_sq (torch's step: 4 bytes more, not counted)


def _tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim())  # 0-d: the step (AdamW), the limiter


def test_apollo_mini_state_is_under_2_percent_of_adamw_on_llama_60m():
    closed = sum(map(lambda s: apollo_state_bytes(s, 1), LLAMA_60M_MATRICES))
    adamw = sum(map(adamw_state_bytes, LLAMA_60M_MATRICES))
    assert closed / adamw <= 0.02  # 0.20%
    measured = {}
    for shape in set(LLAMA_60M_MATRICES):
        w, v = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
        mini, ref = lo.APOLLOMini([w]), torch.optim.AdamW([v], foreach=False)
        w.grad, v.grad = torch.ones(shape), torch.ones(shape)
        mini.step()
        ref.step()
        measured[shape] = (_tensor_bytes(mini.state[w]) + 4, _tensor_bytes(ref.state[v]))
        assert measured[shape] == (apollo_state_bytes(shape, 1), adamw_state_bytes(shape))
        assert "proj" not in mini.state[w]  # drawn again from its seed, never stored
    total = [sum(measured[s][i] for s in LLAMA_60M_MATRICES) for i in (0, 1)]
    assert total[0] / total[1] <= 0.02


# ---- construction --------------------------------------------------------------------


def test_unknown_keyword_raises():
    with pytest.raises(TypeError, match=r"min_8bit_size"):
        lo.APOLLOAdamW([nn.Parameter(torch.zeros(2, 2))], min_8bit_size=64)
    opt = lo.APOLLOAdamW8bit([nn.Parameter(torch.zeros(2, 2))], min_8bit_size=64)
    assert opt.defaults["min_8bit_size"] == 64
    mini = lo.APOLLOMini([nn.Parameter(torch.zeros(2, 2))])
    assert (mini.defaults["rank"], mini.defaults["scale_type"]) == (1, "tensor")
    assert mini.defaults["scale"] == math.sqrt(128)


def test_method_spec_scale_reaches_the_projected_group():
    """``apollo+scale=2`` (the shoot-out's method specs) sets the projected group's α: the
    registry fixes ``scale`` in that group, so as a constructor default it would be
    overridden there and the run would silently be the registry's α."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

    a = common.MethodArgs(lr=1e-2, rank=8)
    for spec, want in [("apollo", 0.7), ("apollo+scale=2", 2.0),
                       ("apollo_mini", math.sqrt(128)), ("apollo_mini+scale=22.63", 22.63),
                       ("apollo_mini+scale=5+rank=2", 5.0), ("galore+scale=0.5", 0.5)]:
        model = common.LlamaLM(common.get_config("micro"))
        _, opt, _ = common.method(spec).build(model, a)
        projected = [g for g in opt.param_groups if g["rank"] is not None]
        assert [g["scale"] for g in projected] == [want], spec
        if spec.startswith("apollo_mini"):
            assert projected[0]["rank"] == (2 if "rank=2" in spec else 1)
