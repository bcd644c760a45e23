"""Registry of optimizer configurations driving the common suite, plus shared helpers.

Every optimizer of the package joins :data:`CONFIGS` with one or more small
configurations; ``tests/test_optimizers.py`` (the common suite) and
``tests/test_hooks.py`` run each test on each of them. :data:`ERRORS` lists bad
constructor arguments with the exception they must raise and a regex that names the
bad value.

The model (:class:`Net`) is deliberately tiny: an ``nn.Embedding(10, 16)`` (2-D,
wide: left basis), ``Linear(16, 32)`` (tall weight: right basis), ``Linear(32, 8)``
(wide weight: left basis) and two 1-D biases, so every side rule, both plain and
projected parameters, and (with ``min_8bit_size=64``) both the 8-bit and the float32
moment paths are exercised on two CPU cores in milliseconds.

Run with ``python -m pytest tests/registry.py`` to check the registry itself.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
import torch
import torch_optimizer
from torch import nn

import lowrank_optim as lo

# tiny tensors: one intra-op thread (fixture in conftest.py; several-fold faster on 2 cores)
pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class OptConfig:
    """One optimizer configuration: ``cls(params, **kwargs)`` on :meth:`model`, and the
    capabilities the common suite relies on (torch's ``OptimizerInfo.supports_*`` habit;
    tests ask these flags, never which method a config is)."""

    id: str
    cls: type
    kwargs: dict = field(default_factory=dict)
    # (swap, kwargs): the model's Linear layers are swapped by swap(model, **kwargs)
    layers: tuple = None
    # a param group's ``rank`` chooses what is projected (False: the layers decide, LoQT)
    supports_group_rank: bool = True
    # the layers' matrices are re-initialised at merges, even at lr 0 (LoQT's B)
    merges_layer_mats: bool = False
    # the layers' matrices hold only what their codes represent (INT8 weights): an update
    # is exact within one code step, and even a zero update's stochastic requantization
    # with fresh ranges may move a code by one
    quantized_layer_mats: bool = False
    # every parameter has the model's dtype (False: INT8 weights are float32 to autograd)
    params_in_model_dtype: bool = True

    def make(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})

    def model(self, seed: int = 0, dtype=torch.float32, **kw) -> "Net":
        """:func:`make_model`, with its Linear layers swapped as this config needs."""
        m = make_model(seed, dtype, **kw)
        if self.layers is not None:
            swap, kwargs = self.layers
            swap(m, target_modules=None, **kwargs)
        return m

    def __repr__(self):  # short pytest ids
        return self.id


class GaLoreYogi(lo.GaLore):
    """``lo.GaLore`` around ``torch_optimizer.Yogi`` (the adapter's registry entry)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, torch_optimizer.Yogi, **kwargs)


# Small rank and a short gap, so that every test run crosses several basis refreshes.
_G = dict(lr=1e-2, rank=4, update_proj_gap=3, scale=1.0)
_L = dict(lr=1e-2, update_proj_gap=3)  # LoQTAdamW
_Q = dict(rank=4, scale=1.0, proj_group_size=32)  # prepare_loqt

CONFIGS = [
    OptConfig("galore_adamw", lo.GaLoreAdamW, dict(_G)),
    OptConfig("galore_adamw_wd", lo.GaLoreAdamW, dict(_G, weight_decay=0.1, scale=0.5)),
    OptConfig("galore_adamw_randomized", lo.GaLoreAdamW, dict(_G, svd="randomized")),
    # proj_type="std" with stagger on is "galore_adamw" (the defaults), with stagger off:
    OptConfig("galore_adamw_no_stagger", lo.GaLoreAdamW, dict(_G, proj_type="std", stagger=False)),
    *[OptConfig(f"galore_adamw_{pt}", lo.GaLoreAdamW, dict(_G, proj_type=pt))
      for pt in ("reverse_std", "left", "right", "full")],
    OptConfig("galore_adamw_project", lo.GaLoreAdamW, dict(_G, state_on_refresh="project")),
    OptConfig("galore_adamw_reset", lo.GaLoreAdamW, dict(_G, state_on_refresh="reset")),
    OptConfig("galore_adamw_plain", lo.GaLoreAdamW, dict(lr=1e-2, rank=None, weight_decay=0.01)),
    # min_8bit_size=64: every low-rank moment of Net (64 to 128 elements) is 8-bit,
    # the biases (32 and 8 elements) keep float32 moments.
    OptConfig("galore_adamw8bit", lo.GaLoreAdamW8bit, dict(_G, min_8bit_size=64)),
    OptConfig("galore_adamw8bit_project", lo.GaLoreAdamW8bit,
              dict(_G, min_8bit_size=64, state_on_refresh="project", weight_decay=0.05)),
    OptConfig("galore_adamw8bit_reset", lo.GaLoreAdamW8bit,
              dict(_G, min_8bit_size=64, state_on_refresh="reset")),
    OptConfig("galore_adafactor", lo.GaLoreAdafactor, dict(_G, beta1=0.9)),
    OptConfig("galore_adafactor_no_beta1", lo.GaLoreAdafactor, dict(_G, beta1=None)),
    OptConfig("galore_adafactor_project", lo.GaLoreAdafactor,
              dict(_G, beta1=0.9, state_on_refresh="project")),
    # Q-GaLore's optimizer mechanics on float weights: INT4 basis (groups of 32 so the
    # small bases have several), lazy refresh after 2 similar SVDs, 8-bit moments.
    # What only quantized weights have is tested in tests/test_q_galore.py.
    OptConfig("q_galore", lo.QGaLoreAdamW8bit,
              dict(_G, min_8bit_size=64, proj_group_size=32, queue_size=2)),
    OptConfig("q_galore_project", lo.QGaLoreAdamW8bit,
              dict(_G, min_8bit_size=64, proj_group_size=32, queue_size=2,
                   state_on_refresh="project")),
    # ... and on INT8 weights (Net's Linear layers become QuantLinear, groups of 64)
    OptConfig("q_galore_int8", lo.QGaLoreAdamW8bit,
              dict(_G, min_8bit_size=64, proj_group_size=32, queue_size=2),
              layers=(lo.quantize_weights, dict(bits=8, group_size=64)),
              quantized_layer_mats=True, params_in_model_dtype=False),
    # any torch optimizer in the low-rank space: Yogi (an int step). Its moments start at
    # initial_accumulator (1e-6), which moves parameters even with zero gradients; 0 here
    # (the common suite asks zero gradients to leave them; the 1e-6 start: test_rules.py)
    OptConfig("galore_yogi", GaLoreYogi, dict(_G, initial_accumulator=0.0)),
    OptConfig("galore_yogi_plain_wd", GaLoreYogi,
              dict(lr=1e-2, rank=None, weight_decay=0.01, initial_accumulator=0.0)),
    # Fira: GaLore's state plus the limiter's norm; APOLLO(-Mini): random projections
    # (reseeded every 3 steps), channel- or tensor-wise scaling of the full gradient
    OptConfig("fira", lo.FiraAdamW, dict(_G)),
    OptConfig("fira_wd_keep", lo.FiraAdamW, dict(_G, weight_decay=0.1, state_on_refresh="keep")),
    OptConfig("apollo", lo.APOLLOAdamW, dict(_G)),
    OptConfig("apollo_mini", lo.APOLLOMini, dict(lr=1e-2, update_proj_gap=3)),
    OptConfig("apollo8bit_reset", lo.APOLLOAdamW8bit,
              dict(_G, min_8bit_size=64, state_on_refresh="reset", weight_decay=0.05)),
    OptConfig("apollo_mini_int8", lo.APOLLOMini, dict(lr=1e-2, update_proj_gap=3),
              layers=(lo.quantize_weights, dict(bits=8, group_size=64)),
              quantized_layer_mats=True, params_in_model_dtype=False),
    # LoQT: Net's two Linear layers become LoQT layers (fc1 tall: P on the input side;
    # fc2 wide: P on the output side); merges at steps 0, 3, 7, 11, ...
    *[OptConfig(f"loqt_{name}", cls, dict(_L, **kw), layers=(lo.prepare_loqt, dict(_Q, **q)),
                supports_group_rank=False, merges_layer_mats=True)
      for name, cls, kw, q in (
          ("nf4", lo.LoQTAdamW, {}, {}),
          ("nf4_64_p4_project", lo.LoQTAdamW, dict(state_on_merge="project"),
           dict(group_size=64, double_quant=False, proj_bits=4)),
          ("int8_keep", lo.LoQTAdamW, dict(state_on_merge="keep"), dict(bits=8)),
          ("nq_reset", lo.LoQTAdamW, dict(state_on_merge="reset"), dict(bits=None, proj_bits=None)),
          ("8bit", lo.LoQTAdamW8bit, dict(min_8bit_size=64, weight_decay=0.01), {}))],
]

BY_ID = {c.id: c for c in CONFIGS}


# ----------------------------------------------------------------------------------------
# bad constructor arguments


@dataclass(frozen=True)
class ErrorCase:
    id: str
    cls: type
    kwargs: dict
    exc: type
    match: str  # regex; must name the bad value

    def __repr__(self):
        return self.id


_ADAMW_LIKE = (lo.GaLoreAdamW, lo.GaLoreAdamW8bit, lo.QGaLoreAdamW8bit, lo.FiraAdamW,
               lo.APOLLOAdamW, GaLoreYogi)
_ALL = (lo.GaLoreAdamW, lo.GaLoreAdamW8bit, lo.GaLoreAdafactor, lo.QGaLoreAdamW8bit,
        lo.FiraAdamW, GaLoreYogi, lo.APOLLOAdamW)  # APOLLO last: it has no svd
_SCALED = (lo.FiraAdamW, lo.APOLLOAdamW, lo.APOLLOMini)


def _each(classes, id, kwargs, exc, match):
    return [ErrorCase(f"{c.__name__}-{id}", c, kwargs, exc, match) for c in classes]


ERRORS = [
    *_each(_ALL, "lr", dict(lr=-1.0), ValueError, r"learning rate: -1\.0"),
    *_each(_ALL, "eps", dict(eps=-1e-8), ValueError, r"eps: -1e-08"),
    *_each(_ALL, "weight_decay", dict(weight_decay=-0.1), ValueError, r"weight_decay: -0\.1"),
    *_each(_ALL, "rank_zero", dict(rank=0), ValueError, r"rank: 0\b"),
    *_each(_ALL, "rank_negative", dict(rank=-3), ValueError, r"rank: -3\b"),
    *_each(_ALL, "rank_float", dict(rank=2.5), ValueError, r"rank: 2\.5"),
    *_each(_ALL, "rank_bool", dict(rank=True), ValueError, r"rank: True"),
    *_each(_ALL, "gap_zero", dict(update_proj_gap=0), ValueError, r"update_proj_gap: 0\b"),
    *_each(_ALL, "gap_float", dict(update_proj_gap=1.5), ValueError, r"update_proj_gap: 1\.5"),
    *_each(_ALL, "scale", dict(scale=0.0), ValueError, r"scale: 0\.0"),
    *_each(_ALL, "proj_type", dict(proj_type="diagonal"), ValueError, r"proj_type: 'diagonal'"),
    *_each(_ALL[:-1], "svd", dict(svd="qr"), ValueError, r"svd: 'qr'"),
    *_each(_ALL, "state_on_refresh", dict(state_on_refresh="zero"), ValueError,
           r"state_on_refresh: 'zero'"),
    *_each(_SCALED, "norm_growth_limit", dict(norm_growth_limit=0.5), ValueError,
           r"norm_growth_limit: 0\.5"),
    *_each(_SCALED, "proj_type_full", dict(proj_type="full"), ValueError,
           r"proj_type: 'full'.*one-sided"),
    ErrorCase("APOLLOAdamW-scale_type", lo.APOLLOAdamW, dict(scale_type="row"), ValueError,
              r"scale_type: 'row'"),
    ErrorCase("APOLLOAdamW-project", lo.APOLLOAdamW, dict(state_on_refresh="project"),
              ValueError, r"state_on_refresh: 'project'.*not orthonormal"),
    ErrorCase("GaLoreYogi-initial_accumulator", GaLoreYogi, dict(initial_accumulator=-1.0),
              ValueError, r"non-finite.*'initial_accumulator': -1\.0"),
    ErrorCase("APOLLOAdamW-seed", lo.APOLLOAdamW, dict(seed=-1), ValueError, r"seed: -1\b"),
    ErrorCase("APOLLOAdamW8bit-min_8bit_size", lo.APOLLOAdamW8bit, dict(min_8bit_size=-1),
              ValueError, r"min_8bit_size: -1\b"),
    *_each(_ADAMW_LIKE, "beta1", dict(betas=(1.0, 0.999)), ValueError,
           r"beta parameter at index 0: 1\.0"),
    *_each(_ADAMW_LIKE, "beta2", dict(betas=(0.9, -0.5)), ValueError,
           r"beta parameter at index 1: -0\.5"),
    ErrorCase("GaLoreAdamW8bit-min_8bit_size", lo.GaLoreAdamW8bit, dict(min_8bit_size=-1),
              ValueError, r"min_8bit_size: -1\b"),
    ErrorCase("GaLoreAdamW8bit-min_8bit_size_str", lo.GaLoreAdamW8bit,
              dict(min_8bit_size="big"), ValueError, r"min_8bit_size: 'big'"),
    ErrorCase("QGaLoreAdamW8bit-proj_bits", lo.QGaLoreAdamW8bit, dict(proj_bits=1),
              ValueError, r"bits: 1\b"),
    ErrorCase("QGaLoreAdamW8bit-proj_group_size", lo.QGaLoreAdamW8bit,
              dict(proj_group_size=0), ValueError, r"group_size: 0\b"),
    ErrorCase("QGaLoreAdamW8bit-cos_threshold", lo.QGaLoreAdamW8bit, dict(cos_threshold=1.5),
              ValueError, r"cos_threshold: 1\.5"),
    ErrorCase("QGaLoreAdamW8bit-gamma_proj", lo.QGaLoreAdamW8bit, dict(gamma_proj=0.5),
              ValueError, r"gamma_proj: 0\.5"),
    ErrorCase("QGaLoreAdamW8bit-queue_size", lo.QGaLoreAdamW8bit, dict(queue_size=0),
              ValueError, r"queue_size: 0\b"),
    ErrorCase("GaLoreAdafactor-beta1", lo.GaLoreAdafactor, dict(beta1=1.0), ValueError,
              r"beta1: 1\.0"),
    ErrorCase("GaLoreAdafactor-clip_threshold", lo.GaLoreAdafactor, dict(clip_threshold=0.0),
              ValueError, r"clip_threshold: 0\.0"),
]


# ----------------------------------------------------------------------------------------
# model, data, training helpers shared by the test files


class Net(nn.Module):
    """Embedding(10, 16) + Linear(16, 32) -> tanh -> Linear(32, 8)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, 8)

    def forward(self, tok, x):
        return self.fc2(torch.tanh(self.fc1(x + self.emb(tok))))


class Block(nn.Module):
    """A transformer-ish block with attn/mlp/embed/norm/head submodules (param_groups)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.attn = nn.ModuleDict({"q": nn.Linear(16, 16), "o": nn.Linear(16, 16, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 8)

    def forward(self, tok):
        h = self.embed(tok)
        h = h + self.attn["o"](torch.tanh(self.attn["q"](h)))
        h = h + self.mlp(self.norm(h))
        return self.head(h)


def mat(layer: nn.Module) -> torch.Tensor:
    """The trainable matrix of a Linear layer: its weight, or a LoQT layer's factor B."""
    return layer.B if isinstance(layer, lo.LoQTLinear) else layer.weight


def make_model(seed: int = 0, dtype=torch.float32, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw).to(dtype)


def generator(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on the test device (``LOWRANK_TEST_DEVICE``, see
    conftest.py): where the factories of the tests put their tensors."""
    return torch.Generator(torch.empty(0).device).manual_seed(seed)


def make_batches(n: int, seed: int = 1, batch: int = 16):
    """``n`` fixed (tok, x, y) batches; y is a smooth function of the inputs."""
    g = generator(seed)
    w = torch.randn(16, 8, generator=g) / 4
    t = torch.randn(10, 8, generator=g)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 10, (batch,), generator=g)
        x = torch.randn(batch, 16, generator=g)
        out.append((tok, x, torch.tanh(x @ w) + 0.5 * t[tok]))
    return out


def error_text(fn) -> str | None:
    """``fn()``'s exception as ``"Type: message"`` (None if it returns): how the
    multi-process tests report an error from a rank to the parent."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported as text
        return f"{type(e).__name__}: {e}"
    return None


def loss_fn(model: nn.Module, batch, sign: float = 1.0) -> torch.Tensor:
    tok, x, y = batch
    dtype = next(model.parameters()).dtype
    return sign * (model(tok, x.to(dtype)).float() - y).square().mean()


def backward_compiled_and_eager(compiled: nn.Module, eager: nn.Module, step: int, batch) -> None:
    """One backward of a ``torch.compile``-d model (nothing may compile again after its first
    step) and of its eager twin on ``batch``; their losses agree."""
    with torch._dynamo.config.patch(error_on_recompile=step > 0):
        l2 = loss_fn(compiled, batch)
        l2.backward()
    l1 = loss_fn(eager, batch)
    l1.backward()
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)


def train(model, opt, batches, *, scheduler=None, accumulate: int = 1, sign: float = 1.0,
          hooks: bool = False) -> list[float]:
    """Normal stepping (``hooks=False``: backward ``accumulate`` times, then ``opt.step()``)
    or per-layer stepping (hooks already registered: just backward). Returns the losses."""
    losses = []
    for i, b in enumerate(batches):
        loss = loss_fn(model, b, sign)
        (loss / accumulate).backward()
        losses.append(loss.item())
        if (i + 1) % accumulate == 0:
            if not hooks:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
    return losses


def roundtrip(obj):
    """torch.save into memory, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype, name
        assert torch.equal(p, q), f"{name}: max |diff| {(p.float() - q.float()).abs().max()}"


def assert_states_equal(o1, o2) -> None:
    """Both optimizers' states are equal, entry by entry, dtype included."""
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert s1[i].keys() == s2[i].keys(), i
        for k, v in s1[i].items():
            w = s2[i][k]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), (i, k)
            else:
                assert v == w, (i, k)


# ----------------------------------------------------------------------------------------
# checks of the registry itself


def test_ids_unique():
    assert len(BY_ID) == len(CONFIGS)
    assert len({e.id for e in ERRORS}) == len(ERRORS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_config_constructs_and_steps(cfg):
    model = cfg.model()
    opt = cfg.make(model.parameters())
    train(model, opt, make_batches(2))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_registry_covers_required_variants():
    kinds = {(c.cls, c.kwargs.get("proj_type", "std")) for c in CONFIGS}
    for pt in ("std", "reverse_std", "left", "right", "full"):
        assert (lo.GaLoreAdamW, pt) in kinds
    policies = {c.kwargs.get("state_on_refresh", "keep") for c in CONFIGS
                if c.cls is lo.GaLoreAdamW}
    assert policies == {"keep", "project", "reset"}
    assert {c.kwargs.get("svd", "exact") for c in CONFIGS} == {"exact", "randomized"}
    assert {c.kwargs.get("stagger", True) for c in CONFIGS} == {True, False}
    assert {c.kwargs.get("beta1", 0.9) for c in CONFIGS if c.cls is lo.GaLoreAdafactor} == {
        0.9, None}


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.cls is lo.GaLoreAdamW8bit], ids=repr)
def test_8bit_path_is_exercised(cfg):
    """Both 8-bit codes (low-rank moments) and float32 moments (small biases) exist."""
    model = cfg.model()
    opt = cfg.make(model.parameters())
    train(model, opt, make_batches(2))
    st = opt.state
    for p in (model.emb.weight, mat(model.fc1), mat(model.fc2)):
        assert st[p]["exp_avg_codes"].dtype == torch.uint8
        assert st[p]["exp_avg_sq_codes"].dtype == torch.uint8
        assert "exp_avg" not in st[p]
    for p in (model.fc1.bias, model.fc2.bias):
        assert st[p]["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in st[p]


def gloo_rank(rank: int, port: int, tmp: str, world: int, jobs: dict) -> None:
    """The body of a :func:`run_on_gloo_ranks` worker: one intra-op thread (two processes
    on a small machine), a gloo group, each of ``jobs`` (name -> function of no arguments)
    run in order, an exception kept as its traceback text (the test of that job fails with
    it), and rank 0 saving the results."""
    import datetime
    import traceback
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, job in jobs.items():
            try:
                results[name] = job()
            except Exception:  # noqa: BLE001 - the test of this job fails with it
                results[name] = traceback.format_exc()
        if rank == 0:
            torch.save(results, f"{tmp}/results.pt")
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(worker, tmp, world: int) -> dict:
    """Run ``worker(rank, port, tmp)`` in ``world`` processes (each opens a gloo group on
    ``port``, a free local port) and return what rank 0 saved to ``tmp/results.pt``. The
    ranks are forked where possible: they inherit the imported modules (torch,
    bitsandbytes: import them before calling), about 2x faster than spawn on 2 cores."""
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(worker, args=(port, str(tmp)), nprocs=world, start_method=method)
    return torch.load(f"{tmp}/results.pt", weights_only=False)
