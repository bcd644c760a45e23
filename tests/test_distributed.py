"""torch.distributed: DDP in normal and per-layer mode, checkpoints, the FSDP2 limit.

Two CPU processes on the ``gloo`` backend, started once for the module (forked: they
inherit the imported modules; starting them costs more than every scenario together):
each rank runs every scenario of :data:`SCENARIOS` and rank 0 saves what they gathered;
the tests check those results. A scenario trains :class:`registry.Net` (GaLoreAdamW,
QGaLoreAdamW8bit on float or INT8 weights, LoQTAdamW on LoQT layers, FiraAdamW, APOLLO
and APOLLO-Mini on INT8 weights) under DDP for 20
optimizer steps with rank 4 and a refresh or merge every 3 steps, each rank on its half
of a 16-row batch, and gathers every rank's parameters and buffers. DDP does not copy
rank 0's buffers at each forward here, so quantization scales and LoQT's ``Q`` and ``P``
must stay identical by themselves. Checked:

* replicas stay bit-identical (max |Δ| between ranks == 0) in normal and per-layer mode,
  with and without ``gradient_as_bucket_view``, with ``no_sync`` accumulation, with a
  module that is used only in some steps (``find_unused_parameters=True``);
* they equal a single-process run on the whole batch within float tolerance (quantized
  models: their outputs), and per-layer mode equals normal stepping bit for bit, also
  after ``handle.remove()``;
* the control: hooks registered on the *inner* module step before the all-reduce (the
  reference GaLore's layer-wise mode) and the replicas drift apart;
* a checkpoint saved by rank 0 resumes every rank bit-identically to an uninterrupted run;
* a second communication hook raises a clear error (FSDP2: ``tests/test_fsdp.py``).

INT8 weights (``QuantWeight``) have an ordinary ``.grad``: DDP itself averages it in its
buckets (the package has no all-reduce of its own for them), and in per-layer mode the
communication hook steps them with every other parameter of their bucket.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lowrank_optim as lo
from registry import error_text, loss_fn, make_batches, make_model, gloo_rank, run_on_gloo_ranks

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.cpu_only(reason="gloo process groups of forked CPU processes"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]

WORLD, STEPS, BATCH = 2, 20, 16
BUCKET_MB = 0.002  # 2 KB: Net's five parameters fall into several DDP buckets
_G = dict(lr=1e-2, rank=4, update_proj_gap=3, scale=1.0)
_Q = dict(_G, min_8bit_size=64, proj_group_size=32, queue_size=2)
_L, _LOQT = dict(lr=1e-2, update_proj_gap=3), dict(rank=4, scale=1.0, proj_group_size=32)
# buffers (quantization scales, LoQT's Q and P) must stay identical by themselves, not
# because DDP copies rank 0's at every forward (torch 2.13 renamed broadcast_buffers)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})


@dataclass(frozen=True)
class Scenario:
    cls: type
    kwargs: dict = field(default_factory=lambda: dict(_G))
    # "step"; "hooks"; "hooks_removed" (registered, removed, then opt.step()); or
    # "hooks_inner" (hooks on ddp.module: they step before the all-reduce, the control)
    mode: str = "step"
    accumulate: int = 1  # micro-batches per step, all but the last under no_sync()
    bucket_view: bool = False
    prepare: str | None = None  # "int8": fc1, fc2 -> QuantLinear; "loqt": -> LoQTLinear
    unused: bool = False  # a head used in even steps only, find_unused_parameters=True


SCENARIOS = {
    "galore_step": Scenario(lo.GaLoreAdamW),
    "galore_hooks": Scenario(lo.GaLoreAdamW, mode="hooks"),
    "galore_hooks_bucket_view": Scenario(lo.GaLoreAdamW, mode="hooks", bucket_view=True),
    "galore_step_no_sync": Scenario(lo.GaLoreAdamW, accumulate=2),
    "galore_hooks_no_sync": Scenario(lo.GaLoreAdamW, mode="hooks", accumulate=2),
    "galore_hooks_unused": Scenario(lo.GaLoreAdamW, dict(_G, weight_decay=0.1), "hooks",
                                    unused=True),
    "galore_randomized_hooks": Scenario(lo.GaLoreAdamW, dict(_G, svd="randomized"), "hooks"),
    "galore_hooks_removed": Scenario(lo.GaLoreAdamW, mode="hooks_removed"),
    "galore_hooks_inner": Scenario(lo.GaLoreAdamW, mode="hooks_inner"),
    "q_galore_step": Scenario(lo.QGaLoreAdamW8bit, dict(_Q)),
    "q_galore_hooks": Scenario(lo.QGaLoreAdamW8bit, dict(_Q), "hooks"),
    "q_galore_int8_step": Scenario(lo.QGaLoreAdamW8bit, dict(_Q), prepare="int8"),
    "q_galore_int8_hooks": Scenario(lo.QGaLoreAdamW8bit, dict(_Q), "hooks", prepare="int8"),
    "q_galore_int8_hooks_no_sync": Scenario(lo.QGaLoreAdamW8bit, dict(_Q), "hooks",
                                            accumulate=2, prepare="int8"),
    "loqt_step": Scenario(lo.LoQTAdamW, dict(_L), prepare="loqt"),
    "loqt_hooks_no_sync": Scenario(lo.LoQTAdamW, dict(_L), "hooks", accumulate=2,
                                   prepare="loqt"),
    # the methods of issue #18: Fira's residual, APOLLO's seeded random projection (drawn
    # alike on every rank), APOLLO-Mini on INT8 weights (Q-APOLLO)
    "fira_hooks_no_sync": Scenario(lo.FiraAdamW, dict(_G), "hooks", accumulate=2),
    "apollo_step": Scenario(lo.APOLLOAdamW, dict(_G)),
    "apollo_mini_int8_hooks": Scenario(lo.APOLLOMini, dict(lr=1e-2, update_proj_gap=3),
                                       "hooks", prepare="int8"),
}
RESUMED = ("galore_hooks", "q_galore_step", "loqt_step")  # also: 10 steps, checkpoint, 10


def _model(sc: Scenario):
    model = make_model()
    if sc.prepare == "int8":
        lo.quantize_weights(model, bits=8, group_size=64, target_modules=("fc",))
    elif sc.prepare == "loqt":
        lo.prepare_loqt(model, target_modules=("fc",), **_LOQT)
    return _Sometimes(model) if sc.unused else model


class _Sometimes(nn.Module):
    """A model plus a head that only even steps use: in odd steps no rank produces its
    gradients, and normal stepping leaves it alone (no momentum, no weight decay)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.head, self.use = net, nn.Linear(8, 8), True

    def forward(self, tok, x):
        y = self.net(tok, x)
        return self.head(y) if self.use else y


def _use_head(model, step: int) -> None:
    if isinstance(model, _Sometimes):
        model.use = step % 2 == 0


def _flat(model) -> torch.Tensor:
    """Every parameter and buffer (integer codes, scales, LoQT bases) as one vector."""
    return torch.cat([t.detach().float().reshape(-1) for t in model.state_dict().values()])


@functools.lru_cache
def _data(n: int) -> list:
    return make_batches(n, seed=1, batch=BATCH)


def _micro_batches(sc: Scenario, step: int):
    """The whole-batch micro-batches of optimizer step ``step`` (every rank builds all)."""
    return _data(STEPS * sc.accumulate)[step * sc.accumulate:(step + 1) * sc.accumulate]


def _train_ddp(sc: Scenario, ddp, opt, rank: int, steps) -> None:
    half = BATCH // WORLD
    for step in steps:
        _use_head(ddp.module, step)
        for i, batch in enumerate(_micro_batches(sc, step)):
            mine = tuple(t[rank * half:(rank + 1) * half] for t in batch)
            last = i == sc.accumulate - 1
            with (ddp.no_sync() if not last else torch.enable_grad()):
                (loss_fn(ddp, mine) / sc.accumulate).backward()
        if sc.mode in ("step", "hooks_removed"):
            opt.step()
            opt.zero_grad()


def _build(sc: Scenario):
    model = _model(sc)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB, gradient_as_bucket_view=sc.bucket_view,
              find_unused_parameters=sc.unused, **_NO_BUFFER_SYNC)
    opt = sc.cls(ddp.parameters(), **sc.kwargs)
    if sc.mode == "hooks_removed":  # the communication hook stays, as a plain all-reduce
        opt.register_hooks(ddp).remove()
    elif sc.mode != "step":
        opt.register_hooks(ddp if sc.mode == "hooks" else model)
    return model, ddp, opt


def _probe(model) -> torch.Tensor:
    """The model's output on a fixed batch (compares quantized models as functions)."""
    _use_head(model, 0)
    with torch.no_grad():
        tok, x, _ = make_batches(1, seed=7, batch=BATCH)[0]
        return model(tok, x)


def _gather(model) -> torch.Tensor:
    flat = _flat(model)
    out = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    return torch.stack(out)


def _run(sc: Scenario, rank: int) -> dict:
    model, ddp, opt = _build(sc)
    _train_ddp(sc, ddp, opt, rank, range(STEPS))
    grads_left = any(p.grad is not None for p in model.parameters())
    # every trainable parameter, INT8 weights included, is one of DDP's bucketed parameters
    in_buckets = {id(p) for p in ddp._module_parameters}
    all_in_buckets = all(id(p) in in_buckets for p in model.parameters() if p.requires_grad)
    return dict(params=_gather(model), grads_left=grads_left, out=_probe(model),
                divergence=lo.distributed.replica_divergence(model),
                all_in_buckets=all_in_buckets)


def _resume(sc: Scenario, rank: int, path: str) -> torch.Tensor:
    model, ddp, opt = _build(sc)
    _train_ddp(sc, ddp, opt, rank, range(STEPS // 2))
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=True)
    model, ddp, opt = _build(sc)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    _train_ddp(sc, ddp, opt, rank, range(STEPS // 2, STEPS))
    return _gather(model)


def _errors() -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    ddp = DDP(make_model())
    ddp.register_comm_hook(None, fp16_compress_hook)
    return {"second_hook": error_text(
        lambda: lo.GaLoreAdamW(ddp.parameters(), **_G).register_hooks(ddp))}


def _worker(rank: int, port: int, tmp: str) -> None:
    jobs = {name: functools.partial(_run, sc, rank) for name, sc in SCENARIOS.items()}
    jobs.update({f"{name}_resumed": functools.partial(_resume, SCENARIOS[name], rank,
                                                      f"{tmp}/{name}.pt") for name in RESUMED})
    gloo_rank(rank, port, tmp, WORLD, {**jobs, "errors": _errors})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # the forked ranks inherit bitsandbytes; they set one intra-op thread, as DataLoader does
    import bitsandbytes  # noqa: F401 - imported once here, not by each rank
    return run_on_gloo_ranks(_worker, tmp_path_factory.mktemp("ddp"), WORLD)


def _reference(sc: Scenario) -> torch.Tensor:
    """One process, the whole batch, the same number of micro-batches and steps."""
    model = _model(sc)
    opt = sc.cls(model.parameters(), **sc.kwargs)
    for step in range(STEPS):
        _use_head(model, step)
        for batch in _micro_batches(sc, step):
            (loss_fn(model, batch) / sc.accumulate).backward()
        opt.step()
        opt.zero_grad()
    return model


def _scenario_result(results, name: str) -> dict:
    r = results[name]
    if isinstance(r, str):
        pytest.fail(f"scenario {name} raised on a rank:\n{r}")
    return r


CORRECT = [n for n in SCENARIOS if n != "galore_hooks_inner"]


@pytest.mark.parametrize("name", CORRECT)
def test_replicas_bit_identical(results, name):
    r = _scenario_result(results, name)
    assert r["all_in_buckets"]
    assert (r["params"][0] - r["params"][1]).abs().max().item() == 0.0
    assert r["divergence"] == 0.0  # the helper the example and benchmark print


@pytest.mark.parametrize("name", CORRECT)
def test_equals_single_process_on_whole_batch(results, name):
    sc, r = SCENARIOS[name], _scenario_result(results, name)
    ref = _reference(sc)
    if sc.prepare is None:
        torch.testing.assert_close(r["params"][0], _flat(ref), rtol=1e-5, atol=1e-5)
    else:
        # the same float updates up to rounding order, but a last-bit difference can move
        # a weight to the neighbouring code (stochastic rounding, NF4): compare outputs
        out, ref_out = r["out"], _probe(ref)
        assert (out - ref_out).abs().max() < 0.01 * ref_out.abs().max(), \
            (out - ref_out).abs().max()


@pytest.mark.parametrize("name", [n for n in CORRECT if SCENARIOS[n].mode == "hooks"])
def test_hooks_free_every_gradient(results, name):
    assert not _scenario_result(results, name)["grads_left"]


def test_hooks_equal_normal_stepping(results):
    step = _scenario_result(results, "galore_step")["params"]
    assert torch.equal(_scenario_result(results, "galore_hooks")["params"], step)
    assert torch.equal(_scenario_result(results, "galore_hooks_removed")["params"], step)
    assert torch.equal(_scenario_result(results, "galore_hooks_no_sync")["params"],
                       _scenario_result(results, "galore_step_no_sync")["params"])
    # INT8 weights: stepped by the communication hook after their bucket's all-reduce
    assert torch.equal(_scenario_result(results, "q_galore_int8_hooks")["params"],
                       _scenario_result(results, "q_galore_int8_step")["params"])


def test_hooks_on_inner_module_drift(results):
    """The control: gradient hooks on the unwrapped module step before the all-reduce."""
    r = _scenario_result(results, "galore_hooks_inner")
    assert (r["params"][0] - r["params"][1]).abs().max().item() > 1e-3
    assert r["divergence"] > 1e-3


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_from_rank0_resumes_every_rank(results, name):
    resumed = results[f"{name}_resumed"]
    assert torch.equal(resumed[0], resumed[1])
    assert torch.equal(resumed, _scenario_result(results, name)["params"])


def test_second_communication_hook_raises(results):
    err = results["errors"]["second_hook"]
    assert err.startswith("RuntimeError") and "communication hook" in err
