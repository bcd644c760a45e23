"""GaLore with a low-rank backward (:mod:`lowrank_optim.lowrank_backward`).

The model is :class:`registry.Net` with ``fc1`` (32x16: right basis under ``"std"``) and
``fc2`` (8x32: left basis) swapped for :class:`~lowrank_optim.GaLoreLinear`; rank 4 and a
refresh every 3 steps, so each 10-step run crosses several refreshes (staggered ones
too). Checked: the run equals normal GaLore (same bases, moments and weights within float
tolerance: the low-rank gradient is dYᵀ(X·Q) instead of (dYᵀX)·Q) for both sides and the
two-sided ``"full"``, in normal and per-layer mode, with ``maximize``, weight decay,
randomized SVD, lo.param_groups and the other GaLore-family optimizers; the weights never
get a ``.grad``; a checkpoint round trips with ``weights_only=True`` (bit-identical
continuation) and the model's keys are a plain model's; under 2-process DDP (gloo) only
the low-rank gradients are in DDP's buckets, the replicas stay bit-identical and equal
normal GaLore under DDP; what cannot work raises.
"""
from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lowrank_optim as lo
from registry import backward_compiled_and_eager, loss_fn, make_batches, make_model, gloo_rank, run_on_gloo_ranks, train

pytestmark = pytest.mark.usefixtures("single_thread")

_G = dict(lr=1e-2, rank=4, update_proj_gap=3, scale=1.0)
STEPS = 10


def _prepared(proj_type: str = "std", seed: int = 0):
    return lo.prepare_galore(make_model(seed), rank=4, proj_type=proj_type,
                             target_modules=("fc",))


def _pairs(ref, model):
    """(normal GaLore's weight, the low-rank backward's weight_lowrank) per swapped layer."""
    return [(ref.fc1.weight, model.fc1.weight_lowrank), (ref.fc2.weight, model.fc2.weight_lowrank)]


def _run(model, opt, batches, hooks: bool, sign: float = 1.0):
    """Train; after every backward the swapped weights have no gradient."""
    handle = opt.register_hooks(model) if hooks else None
    for b in batches:
        loss_fn(model, b, sign).backward()
        for layer in (model.fc1, model.fc2):
            if isinstance(layer, lo.GaLoreLinear):
                assert layer.weight.grad is None and not layer.weight.requires_grad
                assert hooks or layer.weight_lowrank.grad.shape == layer.weight_lowrank.shape
        if not hooks:
            opt.step()
            opt.zero_grad()
    if handle is not None:
        handle.remove()


CASES = {  # id: (optimizer class, options, param_groups?)
    "std": (lo.GaLoreAdamW, {}, False),
    "reverse_std": (lo.GaLoreAdamW, dict(proj_type="reverse_std"), False),
    "full": (lo.GaLoreAdamW, dict(proj_type="full"), False),
    "maximize_wd_keep": (lo.GaLoreAdamW, dict(maximize=True, weight_decay=0.1,
                                               state_on_refresh="keep"), False),
    "randomized_reset_no_stagger": (lo.GaLoreAdamW, dict(svd="randomized", stagger=False,
                                                          state_on_refresh="reset"), False),
    "param_groups": (lo.GaLoreAdamW, {}, True),
    "adamw8bit": (lo.GaLoreAdamW8bit, dict(min_8bit_size=64), False),
    "adafactor": (lo.GaLoreAdafactor, dict(beta1=0.9), False),
    "q_galore": (lo.QGaLoreAdamW8bit, dict(min_8bit_size=64, proj_group_size=32,
                                           queue_size=2), False),
}


@pytest.mark.parametrize("hooks", [False, True], ids=["step", "hooks"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_normal_galore(case, hooks):
    cls, extra, groups = CASES[case]
    kw = dict(_G, **extra)
    sign = -1.0 if kw.get("maximize") else 1.0
    batches = make_batches(STEPS)
    params = lambda m: (lo.param_groups(m, rank=4, target_modules=("fc",)) if groups
                        else m.parameters())
    ref = make_model()
    ref_opt = cls(params(ref), **kw)
    _run(ref, ref_opt, batches, hooks=False, sign=sign)
    model = _prepared(kw.get("proj_type", "std"))
    opt = cls(params(model), **kw)
    _run(model, opt, batches, hooks=hooks, sign=sign)
    for w, low in _pairs(ref, model):
        st, ref_st = opt.state[low], ref_opt.state[w]
        assert st["step"] == ref_st["step"]  # ("reset" restarts it at a refresh)
        assert st["refresh_count"] == ref_st["refresh_count"] >= 3
        assert sorted(st) == sorted(ref_st)
        for key, v in ref_st.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(st[key], v, rtol=1e-4, atol=1e-5, msg=key)
        assert not low.any()  # the proxy's values are never written
    for (k, v), (k2, v2) in zip(sorted(ref.state_dict().items()),
                                sorted(model.state_dict().items())):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-4, atol=1e-5, msg=k)
    assert (model.fc1.weight - make_model().fc1.weight).abs().max() > 1e-2  # it trained


def test_refresh_gradient_is_the_projected_dense_gradient():
    """At a refresh step the low-rank gradient is the projection of the dense gradient in
    the new basis; between refreshes dYᵀ(X·Q) (right) and (dY·P)ᵀX (left)."""
    model, ref = _prepared(), make_model()
    opt = lo.GaLoreAdamW(model.parameters(), **dict(_G, stagger=False))
    for i, b in enumerate(make_batches(2)):
        loss_fn(model, b).backward()
        ref.load_state_dict(model.state_dict())
        ref.zero_grad()
        loss_fn(ref, b).backward()
        q, p = opt.basis(model.fc1.weight_lowrank), opt.basis(model.fc2.weight_lowrank)
        if i == 0:  # the refresh: the bases are the dense gradients' top singular vectors
            torch.testing.assert_close(q, torch.linalg.svd(ref.fc1.weight.grad)[2][:4].T)
            torch.testing.assert_close(p, torch.linalg.svd(ref.fc2.weight.grad)[0][:, :4])
        torch.testing.assert_close(model.fc1.weight_lowrank.grad, ref.fc1.weight.grad @ q)
        torch.testing.assert_close(model.fc2.weight_lowrank.grad, p.T @ ref.fc2.weight.grad)
        opt.step()
        opt.zero_grad()


def test_autocast_bf16():
    """Under CPU autocast the output gradient is bfloat16 and a layer's input may be
    float32: the low-rank gradient is that of nn.Linear under autocast, projected."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)  # 16x64: left basis, fed a float32 input
    model = lo.prepare_galore(nn.Sequential(copy.deepcopy(lin)), rank=4, target_modules=None)
    opt = lo.GaLoreAdamW(model.parameters(), **dict(_G, update_proj_gap=5))
    for _ in range(2):
        x = torch.randn(8, 64)
        for m in (model, lin):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x).float().square().mean()
            loss.backward()  # outside autocast, as recommended
        p = opt.basis(model[0].weight_lowrank)
        torch.testing.assert_close(model[0].weight_lowrank.grad, p.T @ lin.weight.grad,
                                   rtol=2e-2, atol=2e-3)
        opt.step()
        opt.zero_grad()
        lin.load_state_dict(model[0].state_dict())
        lin.zero_grad()


def test_grad_scaler_and_clipping_see_the_low_rank_gradient():
    """GradScaler unscales weight_lowrank's gradient and clip_grad_norm_ clips it like any
    other: a run with a scaler (2^16, no overflow) is the run without, bit for bit."""
    def run(scaler):
        model = _prepared()
        opt = lo.GaLoreAdamW(model.parameters(), **_G)
        for b in make_batches(STEPS):
            loss = loss_fn(model, b)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step() if scaler is None else scaler.step(opt)
            if scaler is not None:
                scaler.update()
            opt.zero_grad()
        return model.state_dict()

    plain, scaled = run(None), run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)


def test_checkpoint_round_trip_weights_only():
    batches = make_batches(STEPS)
    model = _prepared()
    opt = lo.GaLoreAdamW(model.parameters(), **_G)
    _run(model, opt, batches, hooks=False)
    # the model's keys are the plain model's: its checkpoint loads into either
    assert sorted(model.state_dict()) == sorted(make_model().state_dict())
    plain = make_model()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(lo.to_plain(copy.deepcopy(model)).fc2.weight, plain.fc2.weight)
    assert type(lo.to_plain(copy.deepcopy(model)).fc1) is nn.Linear

    first = _prepared()
    opt1 = lo.GaLoreAdamW(first.parameters(), **_G)
    _run(first, opt1, batches[:STEPS // 2], hooks=False)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _prepared(seed=5)
    opt2 = lo.GaLoreAdamW(resumed.parameters(), **_G)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _run(resumed, opt2, batches[STEPS // 2:], hooks=False)
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    # the base's load checks still apply: a state of another rank is refused
    bad = lo.GaLoreAdamW(_prepared("full").parameters(), **dict(_G, proj_type="full"))
    with pytest.raises(ValueError, match="'proj_side' = 1, expected 2, the side of its GaLoreL"):
        bad.load_state_dict(ckpt["opt"])


@pytest.mark.parametrize("proj_type, hooks", [("std", False), ("reverse_std", False),
                                              ("std", True)],
                         ids=["std", "reverse_std", "std_hooks"])
def test_torch_compile_matches_eager(proj_type, hooks):
    """``torch.compile`` (inductor, ``fullgraph=True``: a graph break fails) trains a
    prepared model as eager does over a run that crosses refreshes (gap 3, staggered), for
    both sides (``"std"``: fc1 right, fc2 left; ``"reverse_std"`` swaps them), stepping
    after backward or inside it: losses, low-rank gradients, bases, moments and weights
    within float tolerance. No step after the first compiles again: a refresh runs inside
    the custom op ``lowrank_optim::galore_grad_lowrank`` and changes no guard. Then an
    evaluation under ``torch.no_grad`` (a graph of its own). (``"full"`` compiles and runs
    too, but is no test of equality: its r×r gradient at a refresh is diagonal in exact
    arithmetic, and Adam's first step turns the off-diagonal rounding noise, ~1e-9, into
    updates of ±lr/10, so any two evaluation orders part ways.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kw = dict(_G, proj_type=proj_type)
    eager, model = _prepared(proj_type), _prepared(proj_type)
    assert {eager.fc1.side, eager.fc2.side} == {lo.projector.LEFT, lo.projector.RIGHT}
    o1, o2 = lo.GaLoreAdamW(eager.parameters(), **kw), lo.GaLoreAdamW(model.parameters(), **kw)
    handles = [o1.register_hooks(eager), o2.register_hooks(model)] if hooks else []
    compiled = torch.compile(model, fullgraph=True)
    lows = lambda m: (m.fc1.weight_lowrank, m.fc2.weight_lowrank)
    for t, b in enumerate(make_batches(STEPS)):
        backward_compiled_and_eager(compiled, eager, t, b)
        assert model.fc1.weight.grad is None and model.fc2.weight.grad is None
        if not hooks:
            for p, q in zip(lows(eager), lows(model)):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
            for opt in (o1, o2):
                opt.step()
                opt.zero_grad()
    for p, q in zip(lows(eager), lows(model)):
        st, ref = o2.state[q], o1.state[p]
        assert st["refresh_count"] == ref["refresh_count"] >= 3
        for key, v in ref.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(st[key], v, rtol=1e-4, atol=1e-5, msg=key)
    for (k, v), v2 in zip(eager.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(v2, v, rtol=1e-4, atol=1e-5, msg=k)
    assert (model.fc1.weight - make_model().fc1.weight).abs().max() > 1e-2  # it trained
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # forward+backward, compiled once
    with torch.no_grad():  # evaluation: a graph of its own (plain linear, no autograd)
        torch.testing.assert_close(loss_fn(compiled, b), loss_fn(eager, b),
                                   rtol=1e-5, atol=1e-6)
    for h in handles:
        h.remove()


def test_deepcopy_keeps_the_layer_linked():
    model = copy.deepcopy(_prepared())
    opt = lo.GaLoreAdamW(model.parameters(), **_G)
    _run(model, opt, make_batches(2), hooks=False)
    assert opt.state[model.fc1.weight_lowrank]["step"] == 2
    assert model.fc1.weight_lowrank.lowrank_layer is model.fc1


def test_proxies_share_one_zero_buffer():
    """The weight_lowrank values are never read: every layer's is a view of one shared
    zero buffer (the memory of the largest), also after deepcopy and a dtype change."""
    storage = lambda m: {l.weight_lowrank.untyped_storage().data_ptr() for l in (m.fc1, m.fc2)}
    model = _prepared()
    for m in (model, copy.deepcopy(model), model.double()):
        assert len(storage(m)) == 1
        assert not m.fc1.weight_lowrank.any() and not m.fc2.weight_lowrank.any()
    assert model.fc1.weight_lowrank.dtype == torch.float64


def test_nonfinite_first_refresh_is_retried():
    """A non-finite dense gradient at the first refresh (fp16 GradScaler overflow) leaves
    no basis: the low-rank gradient is NaN (the scaler skips the step) and the next
    backward refreshes."""
    model = _prepared()
    opt = lo.GaLoreAdamW([model.fc1.weight_lowrank, model.fc2.weight_lowrank], **_G)
    tok, x, y = make_batches(1)[0]
    loss_fn(model, (tok, x * float("inf"), y)).backward()
    assert model.fc1.weight_lowrank.grad.isnan().all()
    assert opt.basis(model.fc1.weight_lowrank) is None
    opt.zero_grad()  # what GradScaler.step does instead of opt.step() after an overflow
    loss_fn(model, (tok, x, y)).backward()
    assert model.fc1.weight_lowrank.grad.isfinite().all()
    opt.step()
    assert opt.basis(model.fc1.weight_lowrank) is not None


def test_step_without_the_refresh_of_backward_raises():
    """A refresh is due at the step but backward did not do it (the gradient was produced
    under another optimizer state): step raises instead of projecting a low-rank gradient."""
    model = _prepared()
    opt = lo.GaLoreAdamW(model.parameters(), **_G)
    empty = opt.state_dict()
    _run(model, opt, make_batches(1), hooks=False)
    loss_fn(model, make_batches(1)[0]).backward()
    opt.load_state_dict(empty)
    with pytest.raises(RuntimeError, match="refresh due at step 0 happens in backward"):
        opt.step()


def test_errors():
    model = _prepared()
    opt = torch.optim.AdamW(model.parameters())  # not GaLore-family: nothing would train W
    with pytest.raises(RuntimeError, match="weight_lowrank is in no GaLore-family optimizer"):
        loss_fn(model, make_batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"rank 8 gives 8 .* has rank 4"):
        lo.GaLoreAdamW(model.parameters(), **dict(_G, rank=8))
    with pytest.raises(ValueError, match="proj_type 'left' puts the basis on the left side"):
        lo.GaLoreAdamW(model.parameters(), **dict(_G, proj_type="left"))
    with pytest.raises(ValueError, match="in a param group without rank"):
        lo.GaLoreAdamW([{"params": model.parameters()}, {"params": [], "rank": 4}], lr=1e-2)
    with pytest.raises(ValueError, match="without rank"):
        lo.LoQTAdamW(model.parameters())
    for cls in (lo.FiraAdamW, lo.APOLLOAdamW):  # they add the full gradient back
        with pytest.raises(ValueError, match="needs the full gradient"):
            cls(model.parameters(), **_G)
    del opt
    # the forward saved X·Q (no refresh due); a refresh made due before backward needs X
    opt = lo.GaLoreAdamW(model.parameters(), **_G)
    _run(model, opt, make_batches(1), hooks=False)
    loss = loss_fn(model, make_batches(1)[0])
    opt.state[model.fc1.weight_lowrank]["refresh_next"] = 1
    with pytest.raises(RuntimeError, match="refresh came due between its forward and backward"):
        loss.backward()


# ---- DDP: two CPU processes (gloo), as tests/test_distributed.py ----------------------

WORLD, BATCH = 2, 16
MODES = ("galore", "lowrank_step", "lowrank_hooks")


def _counting_allreduce(numels: list, bucket):
    """DDP's own all-reduce, counting the elements it sends."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    numels.append(bucket.buffer().numel())
    return allreduce_hook(None, bucket)


def _ddp_run(mode: str, rank: int) -> dict:
    model = make_model() if mode == "galore" else _prepared()
    ddp = DDP(model, bucket_cap_mb=0.002)
    opt = lo.GaLoreAdamW(ddp.parameters(), **_G)
    numels = []
    if mode == "lowrank_hooks":
        opt.register_hooks(ddp)
    else:
        ddp.register_comm_hook(numels, _counting_allreduce)
    half = BATCH // WORLD
    for b in make_batches(STEPS, batch=BATCH):
        loss_fn(ddp, tuple(t[rank * half:(rank + 1) * half] for t in b)).backward()
        if mode != "lowrank_hooks":
            opt.step()
            opt.zero_grad()
    flat = torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()])
    out = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    return dict(params=torch.stack(out), numel_per_step=sum(numels) / STEPS,
                weight_grads=[m.weight.grad is not None for m in (model.fc1, model.fc2)])


def _worker(rank: int, port: int, tmp: str) -> None:
    gloo_rank(rank, port, tmp, WORLD,
              {mode: functools.partial(_ddp_run, mode, rank) for mode in MODES})


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    tmp = tmp_path_factory.mktemp("lrb_ddp")
    results = run_on_gloo_ranks(_worker, tmp, WORLD)
    for mode, r in results.items():
        if isinstance(r, str):
            pytest.fail(f"DDP run {mode} raised on a rank:\n{r}")
    return results


@pytest.mark.cpu_only(reason="gloo process groups of forked CPU processes")
def test_ddp_equals_normal_galore(ddp_results):
    galore = ddp_results["galore"]["params"]
    for mode in ("lowrank_step", "lowrank_hooks"):
        r = ddp_results[mode]
        assert torch.equal(r["params"][0], r["params"][1]), mode  # replicas bit-identical
        torch.testing.assert_close(r["params"], galore, rtol=1e-4, atol=1e-5, msg=mode)
        assert r["weight_grads"] == [False, False]
    # only the low-rank gradients (and the unswapped parameters') are all-reduced:
    # emb 10x16, fc1's 32x4 and bias 32, fc2's 4x32 and bias 8 (normal GaLore: 32x16, 8x32)
    assert ddp_results["lowrank_step"]["numel_per_step"] == 160 + 128 + 32 + 128 + 8
    assert ddp_results["galore"]["numel_per_step"] == 160 + 512 + 32 + 256 + 8
    assert torch.equal(ddp_results["lowrank_hooks"]["params"],
                       ddp_results["lowrank_step"]["params"])
