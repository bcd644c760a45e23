"""Optimizer step time, optimizer-state bytes and per-layer peak memory, side by side.

Part 1 (step time and state) takes the matrices of LLaMA-60M (hidden 512, intermediate
1376, 8 layers; per layer q, k, v, o 512x512, gate and up 1376x512, down 512x1376, as
``nn.Linear`` weights [out, in]) and steps every optimizer on fixed random gradients,
set as ``p.grad`` from a pre-generated pool (no backward is timed):

* ``torch.optim.AdamW`` (``foreach=True``, the reference of every ratio) and, for
  information, ``fused=True``;
* ``bitsandbytes.optim.AdamW8bit``;
* ``lowrank_optim.GaLoreAdamW`` with ``svd`` exact / randomized and ``stagger`` on / off;
* ``lowrank_optim.GaLoreAdamW8bit``;
* ``lowrank_optim.QGaLoreAdamW8bit`` on INT8 weights (``QuantLinear``, groups of 256; its
  gradient is an ordinary ``.grad``), INT4 basis, lazy refresh;
* galore-torch 1.0's ``GaLoreAdamW`` when it is installed (``pip install --no-deps
  galore-torch==1.0``; galore-torch imports ``transformers`` only for a version check of
  torch, so when transformers is absent a stub of ``require_version`` is put in place
  for that import). galore-torch's ``GaLoreAdamW8bit`` calls ``torch.cuda.synchronize``
  and runs only on a GPU device.

Every optimizer has its own copy of the parameters and is warmed up (``--warmup`` steps,
the first of which computes every basis), then timed over ``--repeats`` windows of
``--steps`` steps (default: one refresh gap, ``update_proj_gap``, so every matrix is
refreshed exactly once per window, with and without stagger: the amortized time includes
the SVDs). Steps are interleaved: at each step index every optimizer takes one step, in
an order rotated from step to step, so that a noisy stretch on a shared machine hits all
of them alike. Reported per optimizer: mean step time over the windows (amortized), the
median of the steps that refreshed no basis (steady), the slowest step and its ratio to
the steady one, the first (initialisation) step, and ratios to ``torch.optim.AdamW`` and
to galore-torch. State bytes are the sum of ``numel * element_size`` over every tensor
reachable from ``optimizer.state`` (tensors shared between parameters, such as
bitsandbytes' quantization maps, counted once; galore-torch keeps its basis in a
projector object in the state, whose tensors are counted), next to the closed form
(GaLore: ``4 * (2 r max(m, n) + r min(m, n))`` bytes per projected matrix).

Part 2 (peak memory) trains a LLaMA-like stack (RMSNorm, q/k/v/o attention with
``scaled_dot_product_attention``, SwiGLU gate/up/down; same shapes as part 1, no
embedding unless ``--embed``) with a real forward and backward for ``--mem-steps`` steps,
once per configuration, each in its own subprocess (this script with a hidden flag):
normal stepping vs per-layer mode (``opt.register_hooks(model)``). On CPU the peak is
VmHWM from /proc/self/status minus VmRSS before the model is built (the high-water mark
is reset there through /proc/self/clear_refs); the child runs with
``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the system and RSS
follows live memory. On a GPU it is ``torch.cuda.max_memory_allocated`` minus the
allocation before the model. The expected saving of per-layer mode is the total gradient
size minus the largest parameter's gradient.

Results are printed as Markdown and written, with versions, device, threads, date and
the command line, to ``--out`` (``benchmarks/results/step.md``).

Command lines (from the repository root):

    python benchmarks/bench_step.py --quick          # smoke test, about a minute; writes step_quick.md
    python benchmarks/bench_step.py                  # full: rank 128, gap 200, 2 windows of 200 steps
    python benchmarks/bench_step.py --embed          # add the 32000x512 embedding and head (plain params)
    python benchmarks/bench_step.py --skip-memory    # part 1 only
    python benchmarks/bench_step.py --skip-time      # part 2 only
    python benchmarks/bench_step.py --steps 50 --repeats 1   # shorter windows (SVDs then not amortized over a gap)
    python benchmarks/bench_step.py --optimizers adamw_fused,galore_exact,qgalore   # a subset
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
import warnings

# -------------------------------------------------------------------------------------
# defaults (LLaMA-60M, GaLore's hyperparameters)
hidden = 512
intermediate = 1376
n_layers = 8
n_heads = 8
vocab = 32000
embed = False           # include the embedding and the head (32000x512) as plain params
rank = 128
update_proj_gap = 200
scale = 0.25
lr = 1e-3
steps = None            # steps per timed window; None = update_proj_gap
repeats = 2             # timed windows per optimizer
warmup = 3              # untimed steps before the windows (the first computes the bases)
pool = 4                # gradient sets in the pool
seed = 0
mem_batch = 1           # small activations, so the gradients dominate the peak
mem_seq = 32
mem_steps = 3
device = "auto"         # "auto": cuda when available, else cpu
out = "benchmarks/results/step.md"
# -------------------------------------------------------------------------------------

from _paths import ROOT

import torch
from torch import nn

import lowrank_optim as lo
from common import cpu_name

MiB = 2 ** 20


# ---- the model ----------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.h, d // self.h).transpose(1, 2)
                   for f in (self.q_proj, self.k_proj, self.v_proj))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, f: int, h: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn, self.mlp = Attention(d, h), MLP(d, f)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaStack(nn.Module):
    """LLaMA-like decoder without rotary embeddings; embedding and head only if ``vocab``."""

    def __init__(self, d: int, f: int, layers: int, heads: int, vocab: int = 0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d) if vocab else None
        self.layers = nn.ModuleList(Block(d, f, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False) if vocab else None

    def forward(self, x):
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else x


def matrix_shapes(a) -> list[tuple[str, tuple[int, int], bool]]:
    """(name, shape, projected) of part 1's parameters: the 60M matrices (+ embedding/head)."""
    d, f = a.hidden, a.intermediate
    out = [("embed_tokens", (a.vocab, d), False)] if a.embed else []
    for i in range(a.n_layers):
        out += [(f"layers.{i}.attn.{n}_proj", (d, d), True) for n in "qkvo"]
        out += [(f"layers.{i}.mlp.gate_proj", (f, d), True), (f"layers.{i}.mlp.up_proj", (f, d), True),
                (f"layers.{i}.mlp.down_proj", (d, f), True)]
    if a.embed:
        out.append(("lm_head", (a.vocab, d), False))
    return out


# ---- galore-torch (optional peer) ---------------------------------------------------
def import_galore_torch():
    """(module, version) of galore-torch, or (None, why not)."""
    try:
        from importlib.metadata import version

        ver = version("galore-torch")
    except Exception:
        return None, "not installed (pip install --no-deps galore-torch==1.0)"
    stubbed = []
    try:
        importlib.import_module("transformers.utils.versions")
    except ImportError:
        # galore-torch 1.0 imports transformers only for require_version("torch>=1.5.0").
        for name in ("transformers", "transformers.utils", "transformers.utils.versions"):
            mod = types.ModuleType(name)
            mod.__path__ = []
            sys.modules[name] = mod
            stubbed.append(name)
        sys.modules["transformers.utils.versions"].require_version = lambda *a, **k: None
        ver += " (transformers absent: require_version stubbed)"
    try:
        import galore_torch
    except Exception as exc:  # noqa: BLE001
        return None, f"import failed: {exc!r}"
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    return galore_torch, ver


# ---- optimizers ---------------------------------------------------------------------
class ProjectionFloor(torch.optim.Optimizer):
    """Reference row, not an optimizer: only the two GEMMs that GaLore cannot avoid, on a
    fixed orthonormal basis of the ``std`` side (``R = G Q`` or ``P^T G``, then
    ``p.addmm_`` of the back projection, nothing else); plain parameters get ``p -= lr g``."""

    def __init__(self, params, projected, rank: int, lr: float):
        params = list(params)
        super().__init__(params, dict(lr=lr))
        gen = torch.Generator().manual_seed(0)
        for p, pr in zip(params, projected):
            if pr:
                m, n = p.shape
                k = n if m >= n else m
                b = torch.linalg.qr(torch.randn(k, min(rank, m, n), generator=gen))[0]
                self.state[p]["basis"] = b.to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st, g = self.state[p], p.grad
                if "basis" not in st:
                    p.add_(g, alpha=-group["lr"])
                elif p.shape[0] >= p.shape[1]:
                    p.addmm_(g @ st["basis"], st["basis"].T, alpha=-group["lr"])
                else:
                    p.addmm_(st["basis"], st["basis"].T @ g, alpha=-group["lr"])


def galore_groups(params, projected, a):
    mats = [p for p, pr in zip(params, projected) if pr]
    plain = [p for p, pr in zip(params, projected) if not pr]
    g = {"params": mats, "rank": a.rank, "update_proj_gap": a.update_proj_gap,
         "scale": a.scale, "proj_type": "std"}
    return ([{"params": plain}] if plain else []) + [g]


def _int8_weights(ps, pr):
    """Replace, in ``ps`` (in place), every projected matrix by the INT8 weight of a
    ``QuantLinear`` made from it (Q-GaLore's weights); its gradient is an ordinary float32 ``.grad``."""
    for i, (p, proj) in enumerate(zip(ps, pr)):
        if proj:
            lin = nn.Linear(p.shape[1], p.shape[0], bias=False, device=p.device)
            lin.weight.data.copy_(p.data)
            ps[i] = lo.nn.QuantLinear.from_linear(lin, bits=8, group_size=256).weight
    return ps


def optimizer_specs(a, dev, gt):
    """(key, label, factory(params, projected) -> optimizer, kind); kind names the family.
    A factory may replace entries of ``params`` in place (Q-GaLore's INT8 weights)."""
    import bitsandbytes as bnb

    specs = [
        ("adamw_foreach", "torch AdamW (foreach)",
         lambda ps, pr: torch.optim.AdamW(ps, lr=a.lr, foreach=True), "adamw"),
        ("adamw_fused", "torch AdamW (fused)",
         lambda ps, pr: torch.optim.AdamW(ps, lr=a.lr, fused=True), "adamw"),
        ("bnb8", "bnb AdamW8bit", lambda ps, pr: bnb.optim.AdamW8bit(ps, lr=a.lr), "bnb8"),
        ("floor", "(reference) projection GEMMs only",
         lambda ps, pr: ProjectionFloor(ps, pr, a.rank, a.lr), "floor"),
    ]
    for svd in ("exact", "randomized"):
        for stagger in (True, False):
            specs.append((f"galore_{svd}" + ("" if stagger else "_nostagger"),
                          f"GaLoreAdamW {svd}, stagger {'on' if stagger else 'off'}",
                          (lambda svd, stagger: lambda ps, pr: lo.GaLoreAdamW(
                              galore_groups(ps, pr, a), lr=a.lr, svd=svd, stagger=stagger))(svd, stagger),
                          "galore"))
    specs.append(("galore8", "GaLoreAdamW8bit exact, stagger on",
                  lambda ps, pr: lo.GaLoreAdamW8bit(galore_groups(ps, pr, a), lr=a.lr), "galore8"))
    specs.append(("qgalore", "QGaLoreAdamW8bit (INT8 weights, INT4 basis, lazy), exact",
                  lambda ps, pr: lo.QGaLoreAdamW8bit(galore_groups(_int8_weights(ps, pr), pr, a),
                                                     lr=a.lr), "qgalore"))
    if gt is not None:
        specs.append(("gt", "galore-torch GaLoreAdamW",
                      lambda ps, pr: gt.GaLoreAdamW(galore_groups(ps, pr, a), lr=a.lr,
                                                    no_deprecation_warning=True), "gt"))
        if dev.type == "cuda":
            specs.append(("gt8", "galore-torch GaLoreAdamW8bit",
                          lambda ps, pr: gt.GaLoreAdamW8bit(galore_groups(ps, pr, a), lr=a.lr), "gt8"))
    if a.optimizers:
        keys = a.optimizers.split(",")
        unknown = sorted(set(keys) - {k for k, *_ in specs})
        if unknown:
            raise SystemExit(f"--optimizers: unknown {unknown}; choose from "
                             f"{', '.join(k for k, *_ in specs)}")
        specs = [s for s in specs if s[0] in keys or s[0] == "adamw_foreach"]
    return [s[1:] for s in specs]


def _state_tensors(opt):
    """Every tensor reachable from ``opt.state`` (containers and plain Python objects
    walked, 6 levels deep at most)."""
    def walk(v, depth=0):
        if depth > 6:
            return
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from walk(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from walk(x, depth + 1)
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            for x in vars(v).values():
                yield from walk(x, depth + 1)

    for st in opt.state.values():
        yield from walk(st)


def state_bytes(opt) -> int:
    """Sum of numel * element_size over every tensor reachable from ``opt.state``, each
    tensor (device, address, size) counted once."""
    sizes = {(v.device, v.data_ptr(), v.numel() * v.element_size()) for v in _state_tensors(opt)}
    return sum(size for _, _, size in sizes)


def storage_bytes(opt) -> int:
    """Bytes of the distinct storages behind the tensors of ``opt.state``: what memory (and
    a ``torch.save`` of the state) really holds. A view keeps its whole base alive, so this
    exceeds :func:`state_bytes` when the state stores slices of larger tensors."""
    storages = {(v.device, v.untyped_storage().data_ptr()): v.untyped_storage().nbytes()
                for v in _state_tensors(opt)}
    return sum(storages.values())


def closed_form(kind: str, shapes, a) -> int:
    """State bytes predicted for each family (see the module docstring)."""
    def b8(n):  # 8-bit blockwise moments: 2 uint8 codes + 2 float32 absmax per 256
        return 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n

    total = 0
    for _, (m, n), proj in shapes:
        numel = m * n
        r = min(a.rank, m, n)
        if kind == "adamw":
            total += 8 * numel + 4  # two float32 moments, float32 step tensor
        elif kind == "bnb8":
            total += b8(numel)
        elif kind in ("galore", "gt"):
            total += 4 * (2 * r * max(m, n) + r * min(m, n)) if proj else 8 * numel
        elif kind == "galore8":
            total += b8(r * max(m, n)) + 4 * r * min(m, n) if proj else b8(numel)
        elif kind == "floor":
            total += 4 * r * min(m, n) if proj else 0
        else:
            return -1
    if kind == "bnb8" and any(m * n >= 4096 for _, (m, n), _ in shapes):
        total += 2 * 256 * 4  # the two quantization maps, shared by every parameter
    return total


def refresh_counter(kind: str, opt, a):
    """Cumulative number of basis refreshes so far (to tell steady steps from SVD steps)."""
    if kind in ("galore", "galore8", "qgalore"):
        return lambda: sum(st.get("refresh_count", 0) for st in opt.state.values())
    if kind in ("gt", "gt8"):
        def count():
            c = 0
            for g in opt.param_groups:
                if "rank" not in g:
                    continue
                for p in g["params"]:
                    s = opt.state[p].get("step", 0)
                    c += 0 if s == 0 else 1 + (s - 1) // g["update_proj_gap"]
            return c
        return count
    return lambda: 0


# ---- part 1 -------------------------------------------------------------------------
def bench_time(a, dev, gt, log):
    shapes = matrix_shapes(a)
    projected = [pr for _, _, pr in shapes]
    gen = torch.Generator().manual_seed(a.seed)
    master = [torch.randn(s, generator=gen) * 0.02 for _, s, _ in shapes]
    grads = [[torch.randn(s, generator=gen).to(dev) for _, s, _ in shapes] for _ in range(a.pool)]
    n_params = sum(t.numel() for t in master)
    log(f"part 1: {len(shapes)} tensors, {n_params / 1e6:.1f}M params "
        f"({sum(projected)} projected), pool of {a.pool} gradient sets")

    benches = []
    for label, make, kind in optimizer_specs(a, dev, gt):
        params = [nn.Parameter(t.clone().to(dev)) for t in master]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = make(params, projected)
        except Exception as exc:  # noqa: BLE001
            log(f"  skip {label}: {exc!r}")
            continue
        benches.append(dict(label=label, kind=kind, opt=opt, params=params, times=[], refreshed=[],
                            warm=[], cpu=[], count=refresh_counter(kind, opt, a)))

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one_step(b, k):
        for p, g in zip(b["params"], grads[k % a.pool]):
            p.grad = g
        c0 = b["count"]()
        sync()
        c_0, t0 = time.process_time(), time.perf_counter()
        b["opt"].step()
        sync()
        dt = time.perf_counter() - t0
        b["cpu"].append(time.process_time() - c_0)
        return dt, b["count"]() > c0

    log(f"  warm-up: {a.warmup} steps each")
    for s in range(a.warmup):
        for b in benches:
            b["warm"].append(one_step(b, s)[0])
    n_steps = a.steps or a.update_proj_gap
    gc.collect()
    gc.disable()
    try:
        for rep in range(a.repeats):
            t_rep = time.perf_counter()
            for s in range(n_steps):
                j = s % len(benches)
                for b in benches[j:] + benches[:j]:
                    dt, refreshed = one_step(b, a.warmup + rep * n_steps + s)
                    b["times"].append(dt)
                    b["refreshed"].append(refreshed)
            gc.collect()
            log(f"  window {rep + 1}/{a.repeats}: {n_steps} steps x {len(benches)} optimizers "
                f"in {time.perf_counter() - t_rep:.0f} s")
    finally:
        gc.enable()

    ref = next(b for b in benches if b["label"] == "torch AdamW (foreach)")
    gtb = next((b for b in benches if b["kind"] == "gt"), None)
    fused = next((b for b in benches if b["label"] == "torch AdamW (fused)"), None)
    for b in benches:
        t = b["times"]
        windows = [sum(t[i:i + n_steps]) / n_steps for i in range(0, len(t), n_steps)]
        steady_t = [x for x, r in zip(t, b["refreshed"]) if not r] or t
        svd_t = [x for x, r in zip(t, b["refreshed"]) if r]
        b["svd_median"] = statistics.median(svd_t) if svd_t else None
        b["amortized"] = sum(t) / len(t)
        b["steady"] = statistics.median(steady_t)
        b["state"] = state_bytes(b["opt"])
        b["storage"] = storage_bytes(b["opt"])
        b["closed"] = closed_form(b["kind"], shapes, a)
        b["n_refresh_steps"] = sum(b["refreshed"])
        b["windows"] = windows
    rows_t, rows_s = [], []
    for b in benches:
        spread = (f"{1e3 * min(b['windows']):.1f}–{1e3 * max(b['windows']):.1f}"
                  if len(b["windows"]) > 1 else "")
        rows_t.append([
            b["label"], f"{1e3 * b['amortized']:.1f}", spread,
            f"{1e3 * sum(b['cpu'][a.warmup:]) / len(t):.1f}", f"{1e3 * b['steady']:.1f}",
            f"{1e3 * b['svd_median']:.1f}" if b["svd_median"] else "",
            f"{1e3 * max(b['times']):.1f}", f"{max(b['times']) / b['steady']:.2f}",
            f"{b['n_refresh_steps']}", f"{1e3 * b['warm'][0]:.0f}",
            f"{b['amortized'] / ref['amortized']:.2f}",
            f"{b['amortized'] / fused['amortized']:.2f}" if fused else "n/a",
            f"{b['amortized'] / gtb['amortized']:.2f}" if gtb else "n/a"])
        closed = b["closed"]
        rows_s.append([
            b["label"], f"{b['state']:,}", f"{b['state'] / MiB:.2f}",
            f"{closed:,}" if closed >= 0 else "n/a",
            ("yes" if closed == b["state"] else f"no ({b['state'] - closed:+,})") if closed >= 0 else "n/a",
            f"{b['state'] / ref['state']:.3f}", f"{b['storage']:,}", f"{b['storage'] / MiB:.2f}",
            f"{b['storage'] / b['state']:.2f}"])
    t_table = md_table(
        ["optimizer", "amortized ms/step", "window means ms", "amortized CPU ms", "steady median ms",
         "SVD-step median ms", "max step ms",
         "max / steady", "steps with SVD", "first step ms", "× AdamW foreach", "× AdamW fused",
         "× galore-torch"],
        rows_t)
    s_table = md_table(
        ["optimizer", "state bytes (measured)", "MiB", "closed form bytes", "agree", "× AdamW",
         "storage bytes held", "storage MiB", "storage / state"], rows_s)
    info = dict(n_params=n_params, n_tensors=len(shapes), n_projected=sum(projected), steps=n_steps)
    return t_table, s_table, info


# ---- part 2 -------------------------------------------------------------------------
MEM_CONFIGS = [
    ("torch AdamW (foreach), normal", "adamw", False),
    ("GaLoreAdamW, normal", "galore", False),
    ("GaLoreAdamW, per-layer", "galore", True),
    ("GaLoreAdamW8bit, normal", "galore8", False),
    ("GaLoreAdamW8bit, per-layer", "galore8", True),
]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _train(model, opt, inp, tgt, n_steps: int, per_layer: bool, mem_now=None) -> int:
    """Train ``n_steps``; returns the memory held after the last forward (activations saved
    for backward and the output) when ``mem_now`` measures memory, else 0."""
    act = 0
    for _ in range(n_steps):
        m0 = mem_now() if mem_now else 0
        y = model(inp)
        act = mem_now() - m0 if mem_now else 0
        if tgt is not None:
            loss = nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), tgt.reshape(-1))
        else:
            loss = y.float().square().mean()
        loss.backward()
        del y, loss
        if not per_layer:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return act


def _make(kind, model, a, per_layer, rank):
    groups = lo.param_groups(model, rank=rank, update_proj_gap=a.update_proj_gap, scale=a.scale)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, foreach=True)
    elif kind == "galore":
        opt = lo.GaLoreAdamW(groups, lr=a.lr)
    else:
        opt = lo.GaLoreAdamW8bit(groups, lr=a.lr)
    if per_layer:
        opt.register_hooks(model)
    return opt


def _inputs(a, gen, dev, batch, seq, hidden, vocab):
    if vocab:
        x = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(dev)
        return x[:, :-1], x[:, 1:]
    return torch.randn(batch, seq, hidden, generator=gen).to(dev), None


def mem_child(a, config: int) -> dict:
    """One configuration of part 2, in this (fresh) process; returns the measurements.

    A dry run on a tiny model of the same kind comes first, so that the code pages of
    every kernel (mapped from libtorch and bitsandbytes, counted in RSS) are resident
    before the baseline is taken and only allocations count."""
    _, kind, per_layer = MEM_CONFIGS[config]
    dev = torch.device(a.device)
    gen = torch.Generator().manual_seed(a.seed)
    tiny = LlamaStack(64, 160, 1, 2, 100 if a.embed else 0).to(dev)
    inp, tgt = _inputs(a, gen, dev, 2, 16, 64, 100 if a.embed else 0)
    # rank 64: the low-rank moments (160x64, 64x64) reach min_8bit_size, so 8-bit runs too
    _train(tiny, _make(kind, tiny, a, per_layer, 64), inp, tgt, 2, per_layer)
    del tiny, inp, tgt
    torch.manual_seed(a.seed)
    inp, tgt = _inputs(a, gen, dev, a.mem_batch, a.mem_seq, a.hidden, a.vocab if a.embed else 0)
    gc.collect()
    file0 = _status_kib("RssFile") * 1024 if dev.type == "cpu" else 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        how = "torch.cuda.max_memory_allocated - memory_allocated before the model"
    else:
        base = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            how = "VmHWM - VmRSS before the model (VmHWM reset there)"
        except OSError:
            how = "VmHWM - VmRSS before the model (VmHWM could not be reset)"
    model = LlamaStack(a.hidden, a.intermediate, a.n_layers, a.n_heads,
                       a.vocab if a.embed else 0).to(dev)
    opt = _make(kind, model, a, per_layer, a.rank)
    t0 = time.perf_counter()
    mem_now = (torch.cuda.memory_allocated if dev.type == "cuda"
               else lambda: _status_kib("VmRSS") * 1024)
    act = _train(model, opt, inp, tgt, a.mem_steps, per_layer, mem_now)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    secs = time.perf_counter() - t0
    file_growth = _status_kib("RssFile") * 1024 - file0 if dev.type == "cpu" else 0
    params = [p for p in model.parameters() if p.requires_grad]
    gbytes = [p.numel() * p.element_size() for p in params]
    return dict(peak=peak, weights=sum(gbytes), grads=sum(gbytes), largest=max(gbytes),
                state=state_bytes(opt), how=how, n_params=sum(p.numel() for p in params),
                file_growth=file_growth, secs=secs, act=act)


def bench_memory(a, log):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = []
    for i, (label, _, _) in enumerate(MEM_CONFIGS):
        cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", str(i), *child_args(a)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"  {label}: child failed\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {label}: peak {r['peak'] / MiB:.1f} MiB ({time.perf_counter() - t0:.0f} s)")
        res.append((label, r))
    if not res:
        return "(no configuration ran)", {}
    rows = []
    for label, r in res:
        rows.append([label, f"{r['peak'] / MiB:.1f}", f"{r['weights'] / MiB:.1f}",
                     f"{r['state'] / MiB:.1f}", f"{(r['peak'] - r['weights'] - r['state']) / MiB:.1f}",
                     f"{r['grads'] / MiB:.1f}", f"{r['largest'] / MiB:.2f}",
                     f"{r['act'] / MiB:.1f}", f"{r['file_growth'] / MiB:.1f}", f"{r['secs']:.1f}"])
    table = md_table(["configuration", "peak − baseline MiB", "weights MiB", "optimizer state MiB",
                      "rest (grads, activations, temporaries) MiB", "all grads MiB",
                      "largest grad MiB", "activations MiB", "file-backed RSS growth MiB", "train s"],
                     rows)
    by = dict(res)
    lines = []
    for fam in ("GaLoreAdamW", "GaLoreAdamW8bit"):
        n, p = by.get(f"{fam}, normal"), by.get(f"{fam}, per-layer")
        if n and p:
            exp = n["grads"] - n["largest"]
            act = max(n["act"], p["act"])
            exp_act = max(act, n["grads"]) - max(act, n["largest"])
            meas = n["peak"] - p["peak"]
            lines.append([fam, f"{meas / MiB:.1f}", f"{exp / MiB:.1f}", f"{meas / exp:.2f}",
                          f"{exp_act / MiB:.1f}", f"{meas / exp_act:.2f}" if exp_act > 0 else "n/a"])
    saving = md_table(["optimizer", "measured saving MiB (normal − per-layer)",
                       "expected MiB (all grads − largest)", "measured / expected",
                       "rough expectation with activations A: max(A, grads) − max(A, largest)",
                       "measured / rough"], lines)
    how = res[0][1]["how"]
    return table + "\n\n" + saving, dict(how=how, n_params=res[0][1]["n_params"])


# ---- plumbing -----------------------------------------------------------------------
ARG_NAMES = ["hidden", "intermediate", "n_layers", "n_heads", "vocab", "rank", "update_proj_gap",
             "scale", "lr", "seed", "mem_batch", "mem_seq", "mem_steps", "device"]


def child_args(a) -> list[str]:
    out = []
    for k in ARG_NAMES:
        out += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    return out + (["--embed"] if a.embed else [])


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)




def parse(argv=None):
    q = dict(n_layers=1, update_proj_gap=8, repeats=1, warmup=2, pool=2, mem_steps=2)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {q} and --out benchmarks/results/step_quick.md")
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--n-layers", type=int, default=n_layers)
    ap.add_argument("--n-heads", type=int, default=n_heads)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--embed", action="store_true", default=embed,
                    help="include the vocab x hidden embedding and head (plain, not projected)")
    ap.add_argument("--rank", type=int, default=rank)
    ap.add_argument("--update-proj-gap", type=int, default=update_proj_gap)
    ap.add_argument("--scale", type=float, default=scale)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--steps", type=int, default=steps,
                    help="steps per timed window (default: update_proj_gap, one refresh each)")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed windows")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--pool", type=int, default=pool, help="gradient sets in the pool")
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--mem-batch", type=int, default=mem_batch)
    ap.add_argument("--mem-seq", type=int, default=mem_seq)
    ap.add_argument("--mem-steps", type=int, default=mem_steps)
    ap.add_argument("--device", default=device)
    ap.add_argument("--optimizers", default=None,
                    help="comma list of optimizer keys to time (default: all); torch AdamW "
                         "(foreach), the reference of the ratios, always runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=None, help=f"Markdown output (default {out})")
    ap.add_argument("--_mem-child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:])}
        for k, v in q.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(a, k, v)
        a.out = a.out or "benchmarks/results/step_quick.md"
    a.out = a.out or out
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._mem_child is not None:
        print(json.dumps(mem_child(a, a._mem_child)))
        return
    import bitsandbytes as bnb

    t_start = time.perf_counter()
    dev = torch.device(a.device)
    gt, gt_ver = import_galore_torch()
    load0 = os.getloadavg()
    cmd = "python " + " ".join(shlex.quote(x) for x in ([os.path.relpath(__file__, ROOT)] + (
        argv if argv is not None else sys.argv[1:])))
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()

    def log(msg):
        print(msg, flush=True)

    log(f"# {cmd}\n# torch {torch.__version__}, bitsandbytes {bnb.__version__}, galore-torch: "
        f"{gt_ver}; {dev.type} ({devname}), {torch.get_num_threads()} threads")
    sections = []
    if not a.skip_time:
        t0 = time.perf_counter()
        t_table, s_table, info = bench_time(a, dev, gt, log)
        t_time = time.perf_counter() - t0
        sections.append(
            f"## Optimizer step time\n\n{info['n_tensors']} tensors, {info['n_params'] / 1e6:.2f}M "
            f"parameters ({info['n_projected']} projected matrices"
            f"{', embedding and head plain' if a.embed else ''}), rank {a.rank}, "
            f"update_proj_gap {a.update_proj_gap}, scale {a.scale}; {a.warmup} warm-up steps, "
            f"then {a.repeats} window(s) of {info['steps']} steps, interleaved across optimizers "
            f"(rotating order). Fixed random gradients from a pool of {a.pool}; backward not "
            f"timed. *amortized* = mean over all timed steps (SVD steps included); *steady* = "
            f"median of the steps that refreshed no basis; *first step* = the warm-up step "
            f"that computes every basis (not in the windows). Part 1 took {t_time:.0f} s.\n\n"
            f"{t_table}\n\n## Optimizer state\n\nBytes of every tensor in `optimizer.state` "
            f"(shared tensors once) and the closed form: AdamW 8 B/param + a 4 B step tensor per "
            f"parameter; 8-bit (bitsandbytes, GaLoreAdamW8bit) 2 B/element + 2 float32 absmax "
            f"per block of 256 (float32 moments below 4096 elements); GaLore per projected "
            f"m×n matrix 4·(2·r·max(m,n) + r·min(m,n)) B (two float32 moments + float32 basis), "
            f"plain parameters as AdamW.\n\n{s_table}")
    if not a.skip_memory:
        t0 = time.perf_counter()
        log("part 2: peak memory, one subprocess per configuration")
        m_table, minfo = bench_memory(a, log)
        sections.append(
            f"## Peak training memory: normal stepping vs per-layer mode\n\nLLaMA-like stack "
            f"({a.n_layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, {a.n_heads} "
            f"heads, {'embedding and head, ' if a.embed else 'no embedding, '}"
            f"{minfo.get('n_params', 0) / 1e6:.2f}M params), batch {a.mem_batch} × seq {a.mem_seq}, "
            f"{a.mem_steps} training steps (forward, backward, step) per configuration, each in "
            f"its own process; peak = {minfo.get('how', '?')}"
            f"{', MALLOC_MMAP_THRESHOLD_=131072' if dev.type == 'cpu' else ''}. GaLore groups "
            f"from `lowrank_optim.param_groups` (attention and MLP matrices projected, norms "
            f"plain). Per-layer mode frees each gradient as soon as it is applied, so its peak "
            f"moves to the end of the forward pass (activations A, measured as the memory growth "
            f"over the last forward): the saving reaches all grads − largest only while A is "
            f"below the gradients. Part 2 took {time.perf_counter() - t0:.0f} s.\n\n{m_table}")
    load1 = os.getloadavg()
    total = time.perf_counter() - t_start
    header = (
        f"# bench_step: optimizer step time, state and per-layer memory\n\n"
        f"- command: `{cmd}`\n"
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
        f"- torch {torch.__version__}, bitsandbytes {bnb.__version__}, galore-torch {gt_ver}, "
        f"lowrank_optim {lo.__version__}, Python {platform.python_version()}\n"
        f"- device: {dev.type} ({devname}), {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end\n"
        f"- total time: {total:.0f} s\n")
    if max(load0[0], load1[0]) > 0.75 * (os.cpu_count() or 1):
        header += (f"- **warning:** the machine was busy (load average {max(load0[0], load1[0]):.1f} "
                   f"on {os.cpu_count()} CPUs): timings are noisy, re-run on an idle machine\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    path = a.out if os.path.isabs(a.out) else os.path.join(ROOT, a.out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    log(f"written to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
