"""Equivalence tests.

* Parameters that are not projected follow ``torch.optim.AdamW`` (fp32 and bf16, weight
  decay, maximize), whichever way they end up unprojected (``rank=None``, 1-D, a
  galore-torch group without ``rank``, the plain group of ``lo.param_groups``).
* Projected parameters follow a small GaLore reference loop written here from the
  paper and galore-torch's ``GaLoreAdamW`` (not from the package): refresh at steps
  0, T, 2T, ... by ``torch.linalg.svd`` in float32, the side rule of ``proj_type``,
  moments in the low-rank shape, HF-style Adam (``eps`` before bias correction).
* ``rank >= min(m, n)`` still trains.

Hooks mode against normal stepping is in ``test_hooks.py``.

Gradients are synthetic (a fixed random sequence, independent of the parameters), so
both sides see bit-identical gradients and SVD inputs; only the order of floating-point
operations differs, and the tolerances are tight. One loss-driven run checks the same
thing end to end.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from registry import Block, generator, loss_fn, make_batches, make_model, train

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py

STEPS = 20


def _grad_seq(model, steps=STEPS, seed=0, dtype=None):
    g = generator(seed)
    return [[torch.randn(p.shape, generator=g).to(dtype or p.dtype) for p in model.parameters()]
            for _ in range(steps)]


def _run(model, opt, grads):
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _assert_fp32_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _assert_bf16_close(a, b):
    """Bit-equal almost everywhere (>= 99% of elements) and a few bf16 steps apart at most.

    The moments match torch bit for bit; the parameter update is computed as
    ``p - lr * ((m / d) / bc1)`` in float32 where torch computes ``p - (lr / bc1) * (m / d)``,
    so a rare element rounds to the neighbouring bf16 value; that offset then persists
    in absolute terms (also while the value moves towards 0), hence a tolerance of one
    bf16 spacing at the tensor's largest magnitude."""
    assert a.dtype == b.dtype == torch.bfloat16
    a, b = a.detach().float(), b.detach().float()
    spacing = 2.0 ** (math.floor(math.log2(b.abs().max().item())) - 7)
    assert bool(((a - b).abs() <= spacing).all()), float((a - b).abs().max())
    assert (a == b).float().mean().item() >= 0.99


# ---- non-projected parameters == torch.optim.AdamW --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd0", "wd0.1"])
def test_plain_equals_torch_adamw(dtype, maximize, wd):
    m1, m2 = make_model(dtype=dtype), make_model(dtype=dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, maximize=maximize)
    o1 = lo.GaLoreAdamW(m1.parameters(), rank=None, **kw)
    o2 = torch.optim.AdamW(m2.parameters(), **kw)
    grads = _grad_seq(m1)
    _run(m1, o1, grads)
    _run(m2, o2, grads)
    close = _assert_fp32_close if dtype == torch.float32 else _assert_bf16_close
    for p, q in zip(m1.parameters(), m2.parameters()):
        close(p, q)
        s1, s2 = o1.state[p], o2.state[q]
        assert s1["exp_avg"].dtype == s2["exp_avg"].dtype == dtype
        assert s1["step"] == int(s2["step"]) == STEPS
        close(s1["exp_avg"], s2["exp_avg"])
        close(s1["exp_avg_sq"], s2["exp_avg_sq"])


def test_plain_equals_torch_adamw_with_loss():
    """End to end on a loss (not synthetic gradients), with a scheduler."""
    m1, m2 = make_model(), make_model()
    o1 = lo.GaLoreAdamW(m1.parameters(), lr=2e-2, rank=None, weight_decay=0.05)
    o2 = torch.optim.AdamW(m2.parameters(), lr=2e-2, weight_decay=0.05)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, 20)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, 20)
    batches = make_batches(20)
    train(m1, o1, batches, scheduler=s1)
    train(m2, o2, batches, scheduler=s2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unprojected_members_of_galore_optimizers_equal_adamw(dtype):
    """1-D parameters under a rank (biases) and galore-torch groups without ``rank``."""
    close = _assert_fp32_close if dtype == torch.float32 else _assert_bf16_close
    kw = dict(lr=1e-2, weight_decay=0.1)

    # plain parameter list with rank: biases are not projected
    m1, m2 = make_model(dtype=dtype), make_model(dtype=dtype)
    o1 = lo.GaLoreAdamW(m1.parameters(), rank=4, update_proj_gap=3, **kw)
    o2 = torch.optim.AdamW([m2.fc1.bias, m2.fc2.bias], **kw)
    grads = _grad_seq(m1)
    _run(m1, o1, grads)
    _run(m2, o2, grads)
    close(m1.fc1.bias, m2.fc1.bias)
    close(m1.fc2.bias, m2.fc2.bias)

    # galore-torch group format: the rank-less group is AdamW, 2-D included
    m1, m2 = make_model(dtype=dtype), make_model(dtype=dtype)
    plain1 = [m1.emb.weight, m1.fc2.weight, m1.fc1.bias, m1.fc2.bias]
    o1 = lo.GaLoreAdamW([{"params": plain1},
                         {"params": [m1.fc1.weight], "rank": 4, "update_proj_gap": 3}], **kw)
    o2 = torch.optim.AdamW([m2.emb.weight, m2.fc2.weight, m2.fc1.bias, m2.fc2.bias], **kw)
    _run(m1, o1, grads)
    _run(m2, o2, grads)
    assert "proj_side" in o1.state[m1.fc1.weight]
    for a, b in zip(plain1, [m2.emb.weight, m2.fc2.weight, m2.fc1.bias, m2.fc2.bias]):
        close(a, b)


def test_param_groups_plain_group_equals_adamw():
    torch.manual_seed(0)
    m1 = Block()
    torch.manual_seed(0)
    m2 = Block()
    groups = lo.param_groups(m1, rank=4, target_modules=("attn", "mlp"), update_proj_gap=3)
    plain_names = {n for n, p in m1.named_parameters()
                   if any(p is q for q in groups[0]["params"])}
    assert plain_names == {"embed.weight", "attn.q.bias", "mlp.0.bias", "mlp.2.bias",
                           "norm.weight", "norm.bias", "head.weight", "head.bias"}
    o1 = lo.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW([p for n, p in m2.named_parameters() if n in plain_names],
                           lr=1e-2, weight_decay=0.1)
    grads = _grad_seq(m1)
    _run(m1, o1, grads)
    _run(m2, o2, grads)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        if n in plain_names:
            _assert_fp32_close(p, q)
        else:
            assert "proj_side" in o1.state[p]


# ---- projected parameters == a GaLore reference loop -------------------------------------


class RefGaLoreAdamW:
    """galore-torch's GaLoreAdamW for one matrix, written out by hand.

    galore-torch: ``GaLoreProjector.project`` recomputes the basis when
    ``iter % update_proj_gap == 0`` (iter = the step count before this step) from
    ``torch.linalg.svd(grad.float(), full_matrices=False)``; ``std`` puts the basis on the
    smaller side. Adam (HF transformers' AdamW): ``step_size = lr * sqrt(1 - b2^t) /
    (1 - b1^t)``, ``denom = sqrt(v) + eps``, ``p -= step_size * scale * back(m / denom)``.
    ``policy`` adds the package's documented alternatives at a refresh: ``reset`` (zero
    moments, restart t) and ``project`` (M <- R^T M, V <- (R*R)^T V with R = P_old^T P_new,
    per side). ``weight_decay`` is torch's decoupled decay *before* the update (the
    package's documented difference from galore-torch, which decays after it).
    """

    def __init__(self, p, rank, gap, scale, lr, betas, eps, proj_type="std", policy="keep",
                 weight_decay=0.0):
        self.p, self.rank, self.gap, self.scale = p, rank, gap, scale
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        m, n = p.shape
        self.left = proj_type in ("left", "full") or (proj_type == "std" and m < n) or (
            proj_type == "reverse_std" and m >= n)
        self.right = proj_type in ("right", "full") or (proj_type == "std" and m >= n) or (
            proj_type == "reverse_std" and m < n)
        self.policy = policy
        self.P = self.Q = self.M = self.V = None
        self.k = 0  # steps taken
        self.t = 0  # Adam step for bias correction

    def project(self, G):
        if self.left:
            G = self.P.T @ G
        if self.right:
            G = G @ self.Q
        return G

    def back(self, N):
        if self.left:
            N = self.P @ N
        if self.right:
            N = N @ self.Q.T
        return N

    def step(self, grad):
        G = grad.float()
        if self.k % self.gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            r = min(self.rank, *G.shape)
            P, Q = U[:, :r], Vh[:r].T
            if self.M is None:
                self.P, self.Q = P, Q
                shape = self.project(G).shape
                self.M, self.V = torch.zeros(shape), torch.zeros(shape)
            else:
                if self.policy == "reset":
                    self.M.zero_()
                    self.V.zero_()
                    self.t = 0
                elif self.policy == "project":
                    Rl = self.P.T @ P if self.left else None
                    Rr = self.Q.T @ Q if self.right else None
                    if Rl is not None:
                        self.M, self.V = Rl.T @ self.M, Rl.square().T @ self.V
                    if Rr is not None:
                        self.M, self.V = self.M @ Rr, self.V @ Rr.square()
                self.P, self.Q = P, Q
        R = self.project(G)
        self.k += 1
        self.t += 1
        self.M.mul_(self.b1).add_(R, alpha=1 - self.b1)
        self.V.mul_(self.b2).addcmul_(R, R, value=1 - self.b2)
        step_size = self.lr * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        norm = self.back(self.M / (self.V.sqrt() + self.eps)) * self.scale
        with torch.no_grad():
            if self.wd:
                self.p.mul_(1 - self.lr * self.wd)
            self.p.add_(norm, alpha=-step_size)


REF_KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, scale=0.25)


def _shapes():
    return [(32, 16), (8, 32), (10, 16), (12, 12)]


def _synthetic(shape, steps, seed):
    """Gradients with a decaying spectrum (a meaningful top-r subspace) plus noise."""
    g = generator(seed)
    m, n = shape
    out = []
    for _ in range(steps):
        a, b = torch.randn(m, 6, generator=g), torch.randn(6, n, generator=g)
        s = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.5])
        # small, so that eps (1e-6) matters: its placement is checked too
        out.append(1e-3 * (a * s @ b + 0.1 * torch.randn(m, n, generator=g)))
    return out


@pytest.mark.parametrize("proj_type,policy,wd", [
    ("std", "keep", 0.0),  # galore-torch exactly
    ("reverse_std", "keep", 0.0),
    ("left", "keep", 0.0),
    ("right", "keep", 0.0),
    ("full", "keep", 0.0),
    ("std", "reset", 0.0),
    ("std", "project", 0.0),
    ("full", "project", 0.0),
    ("std", "keep", 0.1),
])
def test_projected_equals_reference_loop(proj_type, policy, wd):
    rank, gap = 4, 5  # refreshes at steps 0, 5, 10, 15
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s) * 0.1) for s in _shapes()]
    refs = [RefGaLoreAdamW(p.detach().clone(), rank, gap, proj_type=proj_type, policy=policy,
                           weight_decay=wd, **REF_KW) for p in ps]
    opt = lo.GaLoreAdamW(ps, rank=rank, update_proj_gap=gap, proj_type=proj_type,
                         state_on_refresh=policy, weight_decay=wd, svd="exact", stagger=False,
                         **REF_KW)
    grads = [_synthetic(p.shape, STEPS, seed=i) for i, p in enumerate(ps)]
    for k in range(STEPS):
        for p, ref, gs in zip(ps, refs, grads):
            p.grad = gs[k].clone()
            ref.step(gs[k])
        opt.step()
    for p, ref in zip(ps, refs):
        st = opt.state[p]
        assert st["refresh_count"] == 4
        assert st["exp_avg"].shape == ref.M.shape
        torch.testing.assert_close(st["exp_avg"], ref.M, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], ref.V, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(p.detach(), ref.p, rtol=1e-5, atol=1e-6)


def test_projected_equals_reference_loop_with_loss():
    """End to end on Net's loss (the gradients now depend on the parameters)."""
    rank, gap = 4, 5
    model = make_model()
    ref_model = make_model()
    mats = [model.emb.weight, model.fc1.weight, model.fc2.weight]
    opt = lo.GaLoreAdamW([{"params": mats, "rank": rank, "update_proj_gap": gap},
                          {"params": [model.fc1.bias, model.fc2.bias], "lr": 0.0}],
                         svd="exact", stagger=False, state_on_refresh="keep", **REF_KW)
    ref_mats = [ref_model.emb.weight, ref_model.fc1.weight, ref_model.fc2.weight]
    refs = [RefGaLoreAdamW(p.data, rank, gap, **REF_KW) for p in ref_mats]
    for b in make_batches(STEPS):
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
        loss_fn(ref_model, b).backward()
        for p, ref in zip(ref_mats, refs):
            ref.step(p.grad)
        ref_model.zero_grad()
    for p, q in zip(mats, ref_mats):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


# ---- rank >= min(m, n) -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [lo.GaLoreAdamW, lo.GaLoreAdamW8bit, lo.GaLoreAdafactor],
                         ids=lambda c: c.__name__)
def test_rank_at_least_min_dim_still_trains(cls):
    model = make_model()
    opt = cls(model.parameters(), lr=1e-2, rank=64, update_proj_gap=5, proj_type="std",
              scale=1.0)
    losses = train(model, opt, make_batches(4) * 10)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    # the rank is clipped: the basis is a square orthogonal matrix on the smaller side
    for p in (model.emb.weight, model.fc1.weight, model.fc2.weight):
        basis = opt.state[p]["proj"]
        k = min(p.shape)
        assert basis.shape == (k, k)
        torch.testing.assert_close(basis.T @ basis, torch.eye(k), atol=1e-5, rtol=0)
