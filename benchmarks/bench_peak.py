"""Peak memory of ONE REAL training step of a big LLaMA model, on the CPU.

The targets (issues #4, #5 and #18):

* Q-GaLore: a LLaMA-7B training step (sequence 256, per-layer updates, activation
  checkpointing allowed) under 16 GB;
* LoQT: a LLaMA-7B training step under 24 GB without per-layer updates, and LLaMA-13B
  under 24 GB with per-layer updates and 8-bit moments (on a CPU: with a short sequence);
* APOLLO-Mini on INT8 weights with per-layer updates: a LLaMA-7B step at sequence 256 with
  activation checkpointing at most 12 GB (the APOLLO paper's claim).

What is measured: the **peak RSS of a CPU process** (``common.MemoryMeter``: VmHWM, the
kernel's high-water mark, which ``ru_maxrss`` read for the rows before 2026-12-04), one
fresh subprocess per (method, config), so that peaks never mix. Inside that process the
peak is reset (``/proc/self/clear_refs`` = 5) after ``malloc_trim`` at the start of each phase,
so every phase gets its own peak: building the model, step 0 (the step that computes
every basis: Q-GaLore's first SVD per matrix, LoQT's first merge), step 1 (an ordinary
step). The process peak is the largest of them. A peak RSS includes everything the
process holds: the Python/torch/bitsandbytes runtime (about 0.25 GB, reported as
"runtime"), weights, optimizer state, gradients, activations, allocator slack.

How the big model is built without ever materialising it in float: ``LlamaLM``
(``benchmarks/common.py``, vocabulary 32000 as in the papers) is created on the ``meta``
device, then **one block at a time** the block is materialised in bfloat16 on the CPU
(random init, normal(0, 0.02), residual outputs 0.02/sqrt(2·layers), as ``LlamaLM``
does), converted with the package's own swap (``lo.quantize_weights(block, bits=8,
group_size=256)`` for Q-GaLore: INT8 ``QuantLinear``; ``lo.prepare_loqt(block, rank,
bits=4, scale=0.5, svd=...)`` for LoQT: ``prepare_loqt``'s storage defaults at the row's git
revision, NF4 ``Q`` in blocks of 64 + INT4 ``P`` before 8b58d5b, NF4 blocks of 32 with a
double-quantized absmax + INT8 ``P`` from it; bf16 ``B``) and its
float weights freed before the next block. Embedding, norms and head are materialised
in bfloat16 (the package's layers compute in ``x.dtype``, so activations are bfloat16
too; the loss is taken in float32). Nothing else is approximated: the step is the
package's forward, backward and optimizer update of every parameter, embedding, norms
and head included.

Methods (``--methods``):

* ``qgalore``            ``QGaLoreAdamW8bit`` on the INT8 model: INT4 bases (groups of
  256), lazy refresh, 8-bit moments, stochastic rounding, per-layer updates
  (``opt.register_hooks(model)``), ``update_proj_gap`` 500 (the 7B script), lr 0.004.
* ``qgalore_step``       the same with a normal ``opt.step()`` (for comparison).
* ``loqt``               ``LoQTAdamW`` (moments in B's dtype, bf16), normal ``opt.step()``.
* ``loqt8bit``           ``LoQTAdamW8bit``, normal ``opt.step()`` (the paper's 7B setup).
* ``loqt8bit_per_layer`` ``LoQTAdamW8bit`` with per-layer updates (the paper's 13B setup).
* ``qapollo_mini``       ``APOLLOMini`` on the INT8 model (the APOLLO paper's Q-APOLLO-Mini,
  issue #18): rank 1, tensor-wise scaling, scale √128, float32 moments of the rank-1
  projection, no stored basis, no SVD; per-layer updates, ``update_proj_gap`` 200, lr 0.01.

Ranks (``--rank`` overrides): 128 / 256 / 256 / 512 / 1024 / 1024 for 60m / 130m / 350m /
1b / 7b / 13b (the papers' and the 7B/13B scripts'); APOLLO-Mini's is 1 whatever ``--rank``
(its registry entry fixes it; ``case_rank``). LoQT merges at steps 0, 100, ...
(``update_proj_gap`` 100), so step 0 is a merge step: every layer's dense gradient is formed
in backward one layer at a time, SVD'd right there, and the merge with error compensation
runs in the step (inside backward with per-layer updates).

Time-only settings (they change no tensor that is kept, so not the peak beyond a few
``m × (rank + 8)`` float32 temporaries of the SVD): ``--svd randomized`` (the package's
randomized SVD instead of the exact one), ``--svd-niter`` (power iterations of that
randomized SVD, package default 1; the default here is 0, by wrapping
``lowrank_optim.projector.compute_basis`` with ``niter=0``, because at rank 1024 on two
CPU cores each power iteration costs minutes per layer), ``--ec-iters`` (LoQT's
error-compensation rounds at a merge, package default 5, here 1).

Safety: the parent polls the child's RSS and the machine's ``MemAvailable`` every 0.2 s
and kills the child if it passes ``--max-rss-gb`` or leaves less than ``--min-free-gb``
free (the machine is shared); such a case is reported as stopped, with the RSS reached.
Cases run one after another, never two at once.

GB = 10^9 bytes (the issues' and papers' unit); GiB is given beside the peaks.

On a GPU (``--device cuda``): the same build, steps and per-case subprocesses, with the
blocks materialised and converted on the GPU (``to_empty(device="cuda")``; inputs and the
rotary table there too), so bitsandbytes' CUDA kernels do the NF4 storage and the 8-bit
Adam updates. The peak of each phase (build, step 0, step 1) is
``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()`` at the
phase's start (after ``gc.collect()`` + ``torch.cuda.empty_cache()``, the GPU's counterpart of
the trim above; ``torch.cuda.synchronize()`` before every reading);
``torch.cuda.max_memory_reserved()`` (the allocator's cache included) is reported beside it.
Neither counts the CUDA context (driver and kernel code, outside PyTorch's allocator).
"runtime" is ``torch.cuda.memory_allocated()`` before the build (0 in a fresh process).
The CPU-only machinery is left out there: no RSS guard in the parent (the per-case
``--timeout`` stays), no ``UpdateMeter`` (bitsandbytes' CUDA 8-bit kernel updates in place,
there is no CPU-style transient to split off); the SVD counter stays (synchronised, so its
seconds are the SVDs'). Time-only settings on a GPU: ``--ec-iters`` defaults to the
package's 5 (cheap there, and each extra round's ``m × n`` float32 temporaries then count in
the peak as shipped); ``--svd-niter`` stays 0 as on the CPU (a power iteration re-forms only
``n × q`` / ``m × q`` temporaries that the sketch already makes, yet costs two cuSOLVER QRs
per SVD, and cuSOLVER's QR/SVD/pinv, not the matmuls, set a GPU step 0's time); ``--svd-niter
-1`` for the package's 1, ``--ec-iters 1`` for the CPU rows' setting. Results go to
``benchmarks/results/gpu/peak.md`` unless ``--out`` is given, with the GPU's name, the
torch / CUDA / bitsandbytes versions and the command line.

Command lines (from the repository root):

    python benchmarks/bench_peak.py                               # the issues' cases: hours on 2 cores; the
                                                                  # 13B case needs more than a 24 GB machine
                                                                  # can safely give (the guard stops it)
    python benchmarks/bench_peak.py --configs llama_60m           # smoke test: the 4 issue methods on 60M,
                                                                  # two at a time (~1-2.5 min on a busy 2-core box)
    python benchmarks/bench_peak.py --methods qgalore             # the Q-GaLore issue case only
    python benchmarks/bench_peak.py --configs llama_1b --methods qgalore,loqt8bit --seq 256
    python benchmarks/bench_peak.py --cases qgalore:llama_7b:256:ckpt --merge   # add a row to peak.md (75 min)
    python benchmarks/bench_peak.py --cases qapollo_mini:llama_7b:256:ckpt --merge \
        --estimate-only REASON                                    # a meta-count row only
    python benchmarks/bench_peak.py --one qgalore:llama_60m:256   # one measurement (what the parent runs)
    python benchmarks/bench_peak.py --device cuda --timeout 100 \
        --cases qgalore:llama_7b:256:ckpt,loqt8bit:llama_7b:256,loqt8bit_per_layer:llama_13b:256,qapollo_mini:llama_7b:256:ckpt
                                                                  # the issues' cases on an H200
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

# -------------------------------------------------------------------------------------
# defaults
cases = ("qgalore:llama_7b:256,loqt8bit:llama_7b:256,loqt8bit_per_layer:llama_13b:32,"
         "qapollo_mini:llama_7b:256:ckpt")
steps = 2                 # step 0 (bases/merge) and step 1 (ordinary)
threads = 1               # torch threads (1 measured faster than 2 on this shared machine)
svd = "randomized"
svd_niter = 0             # power iterations of the randomized SVD (package default: 1)
ec_iters = 1              # LoQT error-compensation rounds at a merge (package default: 5)
device = "cpu"            # "cuda": GPU memory (see the docstring)
svd_niter_cuda = 0        # on cuda too: time only (see the docstring); -1: package default
ec_iters_cuda = 5         # on cuda: the package default (its rounds' temporaries are in the peak)
batch = 1
vocab = 32000
seed = 0
timeout = 5400            # seconds per case
max_rss_gb = 21.5         # kill a child whose RSS passes this (10^9 bytes)
min_free_gb = 0.6         # ... or that leaves less than this MemAvailable on the machine
mmap_threshold = 0        # glibc MALLOC_MMAP_THRESHOLD_ for the child (0: glibc's default,
                          # a dynamic threshold that lets freed big temporaries stay in the heap)
out = "benchmarks/results/peak.md"
out_cuda = "benchmarks/results/gpu/peak.md"
# -------------------------------------------------------------------------------------

from _paths import ROOT

GB, GIB = 1e9, 2 ** 30
SMALL_BOUND = 2e9         # cases whose weights + state + grads stay below run two at a time
RUNTIME = 0.28e9          # RSS of the child after importing torch, bitsandbytes, the package
TARGETS = ("attn", "mlp")
RANKS = {"micro": 16, "tiny": 32, "small": 64, "llama_60m": 128, "llama_130m": 256,
         "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024, "llama_13b": 1024}


# this script's method names (the rows of its results files are keyed by them) -> the
# common.METHODS entry that swaps the model and builds the optimizer
METHODS = {"qgalore": "qgalore_per_layer", "qgalore_step": "qgalore", "loqt": "loqt",
           "loqt8bit": "loqt8bit", "loqt8bit_per_layer": "loqt8bit_per_layer",
           "qapollo_mini": "apollo_mini_int8_per_layer"}


def method(name: str):
    """The registry entry of this script's method ``name``, with the settings of the
    papers' 7B/13B scripts: Q-GaLore update_proj_gap 500, scale 0.25, lr 0.004; LoQT merges
    from step 100 (step 0 merges), scale 0.5; APOLLO-Mini update_proj_gap 200, lr 0.01
    (rank 1 and scale √128 fixed by the entry)."""
    import common as C
    return C.METHODS[METHODS[name]]


def family(name: str) -> str:
    return "qgalore" if name.startswith("qgalore") else "apollo" if "apollo" in name else "loqt"


def method_args(name: str, rank: int):
    import common as C
    if family(name) == "qgalore":
        return C.MethodArgs(lr=0.004, rank=rank, update_proj_gap=500, scale=0.25)
    if family(name) == "apollo":
        return C.MethodArgs(lr=1e-2, rank=rank, update_proj_gap=200)
    return C.MethodArgs(lr=1e-3, rank=rank, scale=0.5)


def case_rank(case: "Case", a) -> int:
    """``--rank``, else the config's; 1 for APOLLO-Mini, whose registry entry fixes it."""
    if method(case.method).optimizer_class == "APOLLOMini":
        return 1
    return a.rank or RANKS.get(case.config, 128)


ISSUE_METHODS = ("qgalore", "loqt8bit", "loqt8bit_per_layer", "qapollo_mini")  # --configs
                                                                 # without --methods

# The issues' targets: (method family, config, per-layer) -> (GB, issue)
TARGET_GB = {("qgalore", "llama_7b", True): (16, "#4: 7B, seq 256, per-layer, < 16 GB"),
             ("loqt", "llama_7b", False): (24, "#5: 7B without per-layer updates, < 24 GB"),
             ("loqt", "llama_13b", True): (24, "#5: 13B, per-layer + 8-bit moments, < 24 GB"),
             ("apollo", "llama_7b", True): (12, "#18: 7B, INT8 + APOLLO-Mini + per-layer, seq "
                                                "256, ckpt, ≤ 12 GB")}


@dataclass
class Case:
    method: str
    config: str
    seq: int = 256
    ckpt: bool = False

    @property
    def key(self) -> str:
        return f"{self.method}:{self.config}:{self.seq}" + (":ckpt" if self.ckpt else "")

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.strip().split(":")
        if len(parts) < 2 or parts[0] not in METHODS:
            raise ValueError(f"bad case {text!r}: expected METHOD:CONFIG[:SEQ][:ckpt] with "
                             f"METHOD one of {', '.join(METHODS)}")
        c = cls(parts[0], _config_name(parts[1]))
        for extra in parts[2:]:
            if extra == "ckpt":
                c.ckpt = True
            elif extra.isdigit():
                c.seq = int(extra)
            else:
                raise ValueError(f"bad case {text!r}: {extra!r} is neither a length nor 'ckpt'")
        return c


def _config_name(name: str) -> str:
    import common as C
    key = name if name in C.CONFIGS else f"llama_{name}"
    if key not in C.CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(C.CONFIGS)}")
    return key


# ---- the child: one measurement ---------------------------------------------------------
def _status_kb(field: str) -> int:
    import common as C
    return C._proc_status_kb(field) or 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cuda_env(device) -> dict:
    """The GPU and versions the measuring process saw (for a CUDA table's header)."""
    import torch
    props = torch.cuda.get_device_properties(device)
    try:
        import bitsandbytes as bnb
        bnb_v = bnb.__version__
    except ImportError:
        bnb_v = "not installed"
    return dict(gpu=torch.cuda.get_device_name(device), gpu_memory=props.total_memory,
                capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                torch=torch.__version__, bitsandbytes=bnb_v, python=platform.python_version())


class UpdateMeter:
    """Splits a step's peak at the 8-bit Adam updates of large tensors: wraps
    ``lowrank_optim.functional.adam8bit_`` (looked up at each update) and resets the
    high-water mark before and after each call of at least ``min_numel`` elements, so that
    the peak *during* those calls and the peak *outside* them are both measured (the step's
    peak is the larger). Each call is logged with the RSS it started from."""

    def __init__(self, mem, min_numel: int = 1 << 20):
        import lowrank_optim as lo
        self.F, self.min_numel, self.mem = lo.functional, min_numel, mem
        self.inner = self.F.adam8bit_
        self.F.adam8bit_ = self
        self.start()

    def start(self) -> None:
        self.outside, self.calls = 0, []

    def __call__(self, g, state, *args, **kwargs):
        if g.numel() < self.min_numel:
            return self.inner(g, state, *args, **kwargs)
        mem = self.mem
        self.outside = max(self.outside, mem.peak())
        before = mem.current()
        mem.reset()
        try:
            return self.inner(g, state, *args, **kwargs)
        finally:
            self.calls.append(dict(numel=g.numel(), rss_before=before, peak=mem.peak()))
            mem.reset()
            if len(self.calls) % 64 == 0:
                log(f"    {len(self.calls)} large 8-bit updates done, RSS "
                    f"{mem.current() / GB:.2f} GB")

    def summary(self) -> dict:
        self.outside = max(self.outside, self.mem.peak())
        top = max(self.calls, key=lambda c: c["peak"], default=None)
        return dict(outside=self.outside, n_calls=len(self.calls),
                    during=max((c["peak"] for c in self.calls), default=0),
                    top=top, largest_transient=max(
                        (dict(c, transient=c["peak"] - c["rss_before"]) for c in self.calls),
                        key=lambda c: c["transient"], default=None))


class SVDCounter:
    """Wraps ``lowrank_optim.projector.compute_basis`` (looked up at each refresh) to count
    and time the SVDs, and to set the randomized SVD's power iterations."""

    def __init__(self, niter, mem):
        import lowrank_optim as lo
        self.count, self.seconds, self.niter = 0, 0.0, niter
        self.mem = mem
        self._orig = lo.projector.compute_basis
        lo.projector.compute_basis = self

    def __call__(self, *args, **kwargs):
        if self.niter is not None:
            kwargs["niter"] = self.niter
        self.mem.sync()
        t0 = time.perf_counter()
        try:
            return self._orig(*args, **kwargs)
        finally:
            self.mem.sync()
            self.count += 1
            self.seconds += time.perf_counter() - t0
            if self.count % 32 == 0:
                log(f"    {self.count} SVDs ({self.seconds:.0f} s), {self.mem.what} "
                    f"{self.mem.current() / GB:.2f} GB")


def build_model(case: Case, rank: int, a, mem):
    """LlamaLM on meta, then block by block: materialise in bf16 on ``mem``'s device,
    convert, free."""
    import torch
    from torch import nn
    import lowrank_optim as lo
    import common as C

    dev = mem.device
    cfg = C.get_config(case.config, vocab_size=a.vocab, seq_len=case.seq)
    torch.manual_seed(a.seed)
    with torch.device("meta"):
        model = C.LlamaLM(cfg, checkpointing=case.ckpt)
    model.to(torch.bfloat16)
    std_res = 0.02 / math.sqrt(2 * cfg.n_layers)

    @torch.no_grad()
    def materialise(module: nn.Module, prefix: str) -> None:
        module.to_empty(device=dev)
        for name, p in module.named_parameters():
            if p.dim() == 2:
                full = f"{prefix}.{name}"
                p.normal_(0.0, std_res if full.endswith(("o_proj.weight", "down_proj.weight"))
                          else 0.02)
            else:
                p.fill_(1.0)

    for i, block in enumerate(model.layers):
        materialise(block, f"layers.{i}")
        swap(block, case.method, rank, a)
        if i == 0 or (i + 1) % 8 == 0:
            mem.trim()
            log(f"  block {i + 1}/{cfg.n_layers} converted, {mem.what} "
                f"{mem.current() / GB:.2f} GB")
    for name in ("embed", "norm", "lm_head"):
        materialise(getattr(model, name), name)
    cos, sin = C.rotary_table(cfg.seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
    model._buffers["rope_cos"], model._buffers["rope_sin"] = cos.to(dev), sin.to(dev)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"still on meta: {left[:5]}")
    return model, cfg


def swap(module, name: str, rank: int, a):
    """The registry's swap of ``name`` on ``module`` (a block, or a whole meta model)."""
    m = method(name)
    svd = {"svd": a.svd} if family(name) == "loqt" else {}
    return m.prepare(module, method_args(name, rank), **m.prepare_kwargs, **svd)


def build_optimizer(model, name: str, rank: int, a):
    kw = {"qgalore": dict(svd=a.svd, seed=a.seed), "apollo": dict(seed=a.seed),
          "loqt": dict(update_proj_gap=100, ec_iters=a.ec_iters)}[family(name)]
    prep = method(name).setup(model, method_args(name, rank), **kw)
    return prep.optimizer, prep.hooks


def weight_breakdown(model) -> dict:
    """Bytes of the model's tensors, each storage once: integer codes, float buffers
    (scales, offsets, absmax, the rotary table) and float parameters (bf16)."""
    import common as C

    out = dict(codes=0, scales=0, float_params=0, rope=0)
    seen = set()
    for name, kind, t in C.stored_tensors(model):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        if not t.is_floating_point():
            out["codes"] += n
        elif name.startswith("rope_"):
            out["rope"] += n
        elif kind == "b":
            out["scales"] += n
        else:
            out["float_params"] += n
            del t
    out["total"] = out["codes"] + out["scales"] + out["float_params"] + out["rope"]
    return out


def state_breakdown(opt) -> dict:
    import common as C
    total = C.state_bytes(opt)
    basis = 0
    for st in opt.state.values():
        for k, v in st.items():
            if k.startswith("proj") and hasattr(v, "numel"):
                basis += v.numel() * v.element_size()
    return dict(total=total, basis=basis)


def mode(r: dict) -> str:
    return "per-layer" if method(r["method"]).per_layer else "opt.step()"


def run_one(case: Case, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import lowrank_optim as lo
    import common as C

    m = method(case.method)
    rank = case_rank(case, a)
    mem = C.MemoryMeter(a.device)  # the only device-specific object: RSS or the CUDA allocator
    cuda = mem.cuda
    counter = SVDCounter(a.svd_niter, mem)
    meter = None if cuda else UpdateMeter(mem)  # splits off the CPU 8-bit kernel's transient
    mem.trim()
    runtime = mem.current()
    can_reset = mem.reset()
    log(f"{case.key}: building (runtime {mem.what} {runtime / GB:.2f} GB)")
    t0 = time.perf_counter()
    model, cfg = build_model(case, rank, a, mem)
    opt, hooks = build_optimizer(model, case.method, rank, a)
    build_peak = mem.peak()
    build_reserved = mem.reserved()
    build_s = time.perf_counter() - t0
    weights = weight_breakdown(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{case.key}: built in {build_s:.0f} s; weights {weights['total'] / GB:.2f} GB, "
        f"build peak {build_peak / GB:.2f} GB")
    loqt_layers = [m for m in model.modules() if isinstance(m, lo.LoQTLinear)]
    gen = torch.Generator().manual_seed(a.seed)
    results = []

    def result() -> dict:
        res = dict(case=asdict(case), key=case.key, method=case.method, rank=rank,
                   per_layer=m.per_layer, description=m.description,
                   n_params=n_params, runtime=runtime, build_peak=build_peak, build_s=build_s,
                   weights=weights, state=state_breakdown(opt),
                   grads=C.grad_bytes(model, m.per_layer), steps=results,
                   peak=max([build_peak] + [r["peak"] for r in results]),
                   peak_reset=can_reset, threads=a.threads, svd=a.svd, svd_niter=a.svd_niter,
                   ec_iters=a.ec_iters, batch=a.batch, vocab=a.vocab,
                   mmap_threshold=int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0)))
        if cuda:  # CPU rows keep exactly their old keys
            res.update(device="cuda", env=cuda_env(mem.device), build_reserved=build_reserved,
                       reserved=max([build_reserved] + [r["reserved"] for r in results]))
        return res
    for i in range(a.steps):
        idx = torch.randint(0, cfg.vocab_size, (a.batch, case.seq + 1), generator=gen)
        idx = idx.to(mem.device)  # drawn on the CPU: the same tokens on every device
        x, y = idx[:, :-1], idx[:, 1:]
        mem.trim()
        before = mem.current()
        mem.reset()
        if meter:
            meter.start()
        svds0, svd_s0 = counter.count, counter.seconds
        merges0 = sum(int(m.merges) for m in loqt_layers)
        t = time.perf_counter()
        loss = model(x, y)
        mem.sync()
        t_fwd = time.perf_counter() - t
        loss.backward()
        if not m.per_layer:
            opt.step()
        opt.zero_grad(set_to_none=True)
        mem.sync()
        dt = time.perf_counter() - t
        if meter:
            upd = meter.summary()
            step_peak = max(upd["outside"], upd["during"])
        else:
            upd, step_peak = None, mem.peak()
        svds = counter.count - svds0
        merges = sum(int(m.merges) for m in loqt_layers) - merges0
        kind = ("merge" if merges else "ordinary") if loqt_layers else \
            ("SVD" if svds else "ordinary")
        results.append(dict(step=i, kind=kind, peak=step_peak, hwm=_status_kb("VmHWM") * 1024,
                            rss_before=before, rss_after=mem.current(), seconds=dt,
                            forward_s=t_fwd, svd_s=counter.seconds - svd_s0, svds=svds,
                            merges=merges, loss=float(loss.detach()), updates=upd))
        if cuda:  # on cuda rss_before/rss_after are memory_allocated; hwm the host's
            results[-1]["reserved"] = mem.reserved()
        log(f"{case.key}: step {i} ({kind}, {svds} SVDs, {merges} merges) {dt:.0f} s "
            f"(SVD {counter.seconds - svd_s0:.0f} s), loss {float(loss.detach()):.4f}, "
            f"peak {step_peak / GB:.2f} GB" + (
                f" (outside large 8-bit updates {upd['outside'] / GB:.2f}, during "
                f"{upd['during'] / GB:.2f})" if upd else
                f" allocated, {results[-1]['reserved'] / GB:.2f} GB reserved"))
        del loss
        if i + 1 < a.steps:  # what was measured so far survives a kill or a timeout
            print("PARTIAL " + json.dumps(result()), flush=True)
    return result()


# ---- a meta-device count, for cases too big or too slow to run here -------------------
def estimate(case: Case, name: str, rank: int, a) -> dict:
    """Weights counted on the ``meta`` device after the registry's swap (exact bytes: the
    same buffers and dtypes as a real build), optimizer state from ``common.closed_form``
    (bf16 parameters) and gradients from the swapped model (``common.grad_bytes``). A
    lower bound of the peak: activations, temporaries and the runtime come on top."""
    import torch
    import common as C

    cfg = C.get_config(case.config, vocab_size=a.vocab, seq_len=case.seq)
    with torch.device("meta"):
        model = C.LlamaLM(cfg)
    model.to(torch.bfloat16)
    shapes = C.matrix_shapes(model, TARGETS)
    swap(model, name, rank, a)
    w = dict(codes=0, scales=0, float_params=0)
    for tname, kind, t in C.stored_tensors(model):
        if not tname.startswith("rope_"):
            w["codes" if not t.is_floating_point() else "scales" if kind == "b"
              else "float_params"] += C.tensor_bytes(t)
    w["total"] = sum(w.values())
    m = method(name)
    return dict(weights=w, state=C.closed_form(m.optimizer_class, shapes, rank, 2)[1],
                grads=C.grad_bytes(model, m.per_layer),
                n_params=sum(p.numel() for p in model.parameters()))


# ---- the parent: run the cases, guard memory, write the table -------------------------
def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(case: Case, a, argv_common: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", case.key] + argv_common
    log(f"running {' '.join(shlex.quote(c) for c in cmd)}")
    out_path = f"/tmp/bench_peak_{os.getpid()}_{re.sub(r'[^A-Za-z0-9_]', '_', case.key)}.json"
    t0 = time.perf_counter()
    with open(out_path, "w") as fout:
        env = dict(os.environ)
        if a.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
        proc = subprocess.Popen(cmd, stdout=fout, cwd=ROOT, env=env)
        max_seen, stop = 0, None
        guard = a.device == "cpu"  # the RSS guard is for this shared CPU box; GPU: timeout only
        while proc.poll() is None:
            r = _child_rss(proc.pid)
            max_seen = max(max_seen, r)
            avail = _meminfo_kb("MemAvailable") * 1024
            if not guard:
                pass
            elif r > a.max_rss_gb * GB:
                stop = f"RSS {r / GB:.2f} GB passed --max-rss-gb {a.max_rss_gb}"
            elif avail < a.min_free_gb * GB:
                stop = (f"machine MemAvailable {avail / GB:.2f} GB fell below --min-free-gb "
                        f"{a.min_free_gb} (child RSS {r / GB:.2f} GB)")
            if not stop and time.perf_counter() - t0 > a.timeout:
                stop = f"timeout {a.timeout} s"
            if stop:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    text = open(out_path).read()
    os.remove(out_path)
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    partial = [ln for ln in text.splitlines() if ln.startswith("PARTIAL ")]
    errors = [json.loads(ln[len("ERROR "):]) for ln in text.splitlines()
              if ln.startswith("ERROR ")]
    if errors and not stop:
        stop = f"exit code {proc.returncode}: {errors[-1]}"
    if not lines and partial:
        why = stop or f"exit code {proc.returncode}"
        res = json.loads(partial[-1][len("PARTIAL "):])
        res["incomplete"] = f"stopped after step {res['steps'][-1]['step']}: {why}"
        log(f"{case.key}: {res['incomplete']}")
        res["max_rss_seen"], res["wall"] = max_seen, wall
        return res
    if stop or proc.returncode != 0 or not lines:
        why = stop or f"exit code {proc.returncode}"
        log(f"{case.key}: NOT MEASURED ({why}); max RSS seen {max_seen / GB:.2f} GB")
        return dict(case=asdict(case), key=case.key, method=case.method, error=why,
                    max_rss_seen=max_seen, wall=wall)
    res = json.loads(lines[-1][len("RESULT "):])
    res["max_rss_seen"], res["wall"] = max_seen, wall
    return res


def gb(n) -> str:
    return "–" if n is None else f"{n / GB:.2f}"


def _outside(s: dict) -> str:
    u = s.get("updates")
    return gb(u["outside"]) if u else "–"


def _largest(s: dict) -> str:
    u = s.get("updates")
    t = u and u.get("largest_transient")
    return f"{gb(t['transient'])} ({t['numel'] / 1e6:.0f}M)" if t else "–"


def _target(res: dict):
    return TARGET_GB.get((family(res["method"]), res["case"]["config"],
                          method(res["method"]).per_layer))


def render(rows: list, meta: dict, device: str = "cpu") -> str:
    """The results file. ``device`` "cuda" relabels the memory columns (CUDA allocator
    peaks, ``max_memory_reserved`` where the CPU table has the ``UpdateMeter`` split) and
    the notes; the CPU text is the same as ever."""
    cuda = device == "cuda"
    L = []
    add = L.append
    if cuda:
        add("# bench_peak: peak GPU memory of one real training step (LLaMA 7B / 13B on CUDA)\n")
        add("**What is measured: the peak memory allocated by PyTorch's CUDA allocator** "
            "(`torch.cuda.max_memory_allocated()`, one fresh subprocess per row, "
            "`torch.cuda.reset_peak_memory_stats()` after `gc.collect()` + "
            "`torch.cuda.empty_cache()` at the start of each phase: build, step 0, step 1; "
            "`torch.cuda.synchronize()` before every reading). Beside it "
            "`torch.cuda.max_memory_reserved()`: what the allocator held from the driver, its "
            "cache included. Neither counts the CUDA context (driver, kernel code), which is "
            "outside the allocator. It includes every tensor and temporary: weights, optimizer "
            "state, gradients, activations, the SVDs' and bitsandbytes' workspaces. "
            "GB = 10^9 bytes.\n")
    else:
        add("# bench_peak: peak memory of one real training step (LLaMA 7B / 13B on the CPU)\n")
        add("**What is measured: the peak RSS of a CPU process** (`resource.getrusage(RUSAGE_SELF)"
            ".ru_maxrss`, one fresh subprocess per row, the high-water mark reset through "
            "`/proc/self/clear_refs` at the start of each step), not GPU memory: no GPU was "
            "available. It includes the Python/torch/bitsandbytes runtime, allocator slack and "
            "every temporary. GB = 10^9 bytes.\n")
    for k, v in meta.items():
        add(f"- {k}: {v}")
    add("")
    add("## Targets\n")
    if cuda:
        add("*met*: the peak allocated is below the target. *peak reserved*: the largest "
            "`max_memory_reserved` of the row's phases (allocator cache included).\n")
        add("| issue target | row | peak allocated GB (GiB) | peak reserved GB | met |")
    else:
        add("*outside*: the largest per-step peak outside the 8-bit Adam updates of tensors of "
            ">= 2^20 elements, i.e. without the CPU-only transient of bitsandbytes' 8-bit kernel "
            "(see the notes); a measured part of the peak, not a target reading.\n")
        add("| issue target | row | peak RSS GB (GiB) | outside GB | met |")
    add("|---|---|---|---|---|")
    for r in rows:
        t = _target(r) if "error" not in r else None
        if t is None and "error" in r:
            t = TARGET_GB.get((family(r["method"]), r["case"]["config"],
                               method(r["method"]).per_layer))
            if t:
                e = r.get("estimate")
                rt = (r.get("runtime") or 0) if cuda else RUNTIME
                lb = "" if not e else (f"; lower bound (weights + state + grads + runtime) "
                                       f"{gb(e['weights']['total'] + e['state'] + e['grads'] + rt)}")
                add(f"| {t[1]} | `{r['key']}` | not measured: {r['error']}{lb} | – | – |")
            continue
        if t is None:
            continue
        p = r["peak"]
        ok = p < t[0] * GB
        note = f" ({r['incomplete']})" if r.get("incomplete") else ""
        if cuda:
            second = r.get("reserved")
        else:
            second = max((s["updates"]["outside"] for s in r["steps"] if s.get("updates")),
                         default=None)
        add(f"| {t[1]} | `{r['key']}`{note} | {gb(p)} ({p / GIB:.2f}) | {gb(second)} | "
            f"{'**met**' if ok else '**not met**'} |")
    add("")
    add("## Per step\n")
    if cuda:
        add("*peak allocated*: `max_memory_allocated` during that step (forward + backward + "
            "update); *peak reserved*: `max_memory_reserved` likewise. *allocated before*: what "
            "the process held when the step began (after the build, and for step 1 also the "
            "optimizer state created by step 0). *weights*: integer codes + float32 scales/"
            "offsets/absmax + float parameters (bf16), each storage once. *state*: every tensor "
            "in `opt.state` (bitsandbytes' shared maps once). *grads*: what the gradients take "
            "(computed: all trainable parameters with `opt.step()`; the largest one with "
            "per-layer updates; float32 for INT8 weights). *step s*, *SVD s*: synchronised wall "
            "times; *SVD s*: time inside `lowrank_optim.projector.compute_basis`.\n")
        add("| method | config | seq | checkpointing | mode | step | kind | peak allocated GB | "
            "peak reserved GB | allocated before GB | weights GB | state GB | grads GB | "
            "step s | SVD s | loss |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        add("*peak*: peak RSS during that step (forward + backward + update). *RSS before*: "
            "what the process held when the step began (after the build, and for step 1 also "
            "the optimizer state created by step 0). *weights*: integer codes + float32 scales/"
            "offsets/absmax + float parameters (bf16), each storage once. *state*: every tensor in "
            "`opt.state` (bitsandbytes' shared maps once). *grads*: what the gradients take "
            "(computed: all trainable parameters with `opt.step()`; the largest one with per-layer "
            "updates; float32 for INT8 weights). *SVD s*: time inside "
            "`lowrank_optim.projector.compute_basis`.\n")
        add("*outside*: the step's peak outside the 8-bit Adam updates of tensors of >= 2^20 "
            "elements; *largest update*: the largest RSS rise during one such update (its tensor's "
            "elements in parentheses; `UpdateMeter` in the script).\n")
        add("| method | config | seq | checkpointing | mode | step | kind | peak RSS GB | "
            "outside GB | largest update GB | RSS before GB | weights GB | state GB | grads GB | "
            "step s | SVD s | loss |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    blanks = "| | | | | | | | | |" if cuda else "| | | | | | | | | | |"
    for r in rows:
        c = r["case"]
        if "error" in r:
            add(f"| {r['method']} | {c['config']} | {c['seq']} | {'yes' if c['ckpt'] else 'no'} "
                f"| {mode(r)} | – | "
                f"not measured: {r['error']} (max {'host ' if cuda else ''}RSS seen "
                f"{gb(r['max_rss_seen'])}) " + blanks)
            continue
        for s in r["steps"]:
            split = gb(s.get("reserved")) if cuda else f"{_outside(s)} | {_largest(s)}"
            add(f"| {r['method']} | {c['config']} | {c['seq']} | {'yes' if c['ckpt'] else 'no'} "
                f"| {mode(r)} | {s['step']} | "
                f"{s['kind']} ({s['svds']} SVDs{', %d merges' % s['merges'] if s['merges'] else ''}) "
                f"| **{gb(s['peak'])}** | {split} | {gb(s['rss_before'])} | "
                f"{gb(r['weights']['total'])} | "
                f"{gb(r['state']['total'])} | {gb(r['grads'])} | {s['seconds']:.1f} | "
                f"{s['svd_s']:.1f} | {s['loss']:.3f} |")
    add("")
    add("## Per process\n")
    if cuda:
        add("| row | rank | parameters | allocated before the build GB | build peak GB | "
            "build reserved GB | build s | process peak GB (GiB) | process reserved GB | "
            "codes GB | scales GB | float params GB | basis in state GB | wall s |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        add("| row | rank | parameters | runtime GB | build peak GB | build s | process peak GB "
            "(GiB) | codes GB | scales GB | float params GB | basis in state GB | wall s |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            continue
        w = r["weights"]
        build = (f"{gb(r['build_peak'])} | {gb(r.get('build_reserved'))}" if cuda
                 else gb(r['build_peak']))
        proc = (f"{gb(r['peak'])} ({r['peak'] / GIB:.2f}) | {gb(r.get('reserved'))}" if cuda
                else f"{gb(r['peak'])} ({r['peak'] / GIB:.2f})")
        add(f"| `{r['key']}` | {r['rank']} | {r['n_params'] / 1e9:.3f} B | {gb(r['runtime'])} | "
            f"{build} | {r['build_s']:.0f} | {proc} | {gb(w['codes'])} | {gb(w['scales'])} | "
            f"{gb(w['float_params'])} | {gb(r['state']['basis'])} | {r['wall']:.0f} |")
    add("")
    add("## Notes\n")
    if cuda:
        add("- The 8-bit Adam updates run bitsandbytes' fused CUDA kernel in place (no "
            "float32 copies of the moments as on the CPU); `lowrank_optim.functional.adam8bit_` "
            "adds its float32 direction of the tensor's size.")
        add("- *Time-only settings*: the randomized SVD's power iterations and LoQT's error-"
            "compensation rounds change no tensor that is kept; the peak moves by at most a few "
            "float32 `m × (rank + 8)` / `m × n` temporaries of one layer. The CPU rows "
            "(`benchmarks/results/peak.md`) used 0 power iterations and `ec_iters=1`.")
    else:
        per_el = [s["updates"]["largest_transient"]["transient"]
                  / s["updates"]["largest_transient"]["numel"]
                  for r in rows if "steps" in r for s in r["steps"]
                  if s.get("updates") and s["updates"].get("largest_transient")]
        add("- **The 8-bit Adam update of a large tensor costs about "
            + (f"{min(per_el):.0f}–{max(per_el):.0f}" if per_el else "30")
            + " bytes per element of transient memory on the CPU** (column *largest update*; "
            "the tensor is the embedding or the head, 32000 × d). bitsandbytes 0.50's CPU "
            "kernel (`bitsandbytes/backends/cpu/ops.py`, `_optimizer_update_8bit_blockwise_cpu`) "
            "dequantizes both moments of the whole tensor to float32, copies the gradient and "
            "forms the denominator in float32; `lowrank_optim.functional.adam8bit_` adds a "
            "float32 copy of the gradient and a float32 direction of the full size. On a GPU the "
            "fused kernel updates in place (only the package's 8 bytes per element remain). "
            "Since commit ffbfce9 `adam8bit_` calls the kernel on slices of 2^22 elements, 2^20 "
            "since 2026-11-22T17:00 (whole 256-element blocks: bitwise the same result), so the transient is that of one "
            "slice; rows measured before it (dated before 2026-11-22T15:50, with no `git` in "
            "their JSON) show the whole-tensor transient.")
        add("- *Time-only settings*: the randomized SVD's power iterations and LoQT's error-"
            "compensation rounds change no tensor that is kept; the peak moves by at most a few "
            "float32 `m × (rank + 8)` / `m × n` temporaries of one layer.")
    add("- A row marked *incomplete* was stopped (timeout, guard) after the steps listed; "
        "what those steps measured is kept.")
    add("")
    add("## Lower bound from a meta count\n")
    add("Weights counted on the `meta` device after the package's own swap (same buffers and "
        "dtypes as the real build), optimizer state and gradients from the closed form of the "
        "package's dtypes (`estimate()` in the script; it matches the real counts above to "
        "the byte up to the rotary table). *grads*: all trainable parameters with "
        "`opt.step()`, the largest one with per-layer updates. *bound* = weights + state + "
        + ("grads + what was allocated before the build (0 in a fresh process): what any step "
           "must hold at its peak, before activations and temporaries. *measured − bound*: "
           "activations, temporaries, allocator fragmentation.\n" if cuda else
           "grads + the runtime (0.28 GB measured): what any step must hold at its peak, before "
           "activations and temporaries. *measured − bound*: activations, temporaries, allocator "
           "slack.\n"))
    add("| row | weights GB | state GB | grads GB | bound GB | measured peak GB | "
        "measured − bound GB |")
    add("|---|---|---|---|---|---|---|")
    for r in rows:
        e = r.get("estimate")
        if not e:
            continue
        rt = (r.get("runtime") or 0) if cuda else RUNTIME
        bound = e["weights"]["total"] + e["state"] + e["grads"] + rt
        p = r.get("peak")
        add(f"| `{r['key']}`{' (not run)' if r.get('estimate_only') else ''} | "
            f"{gb(e['weights']['total'])} | {gb(e['state'])} | {gb(e['grads'])} | {gb(bound)} | "
            f"{gb(p)} | {gb(None if p is None else p - bound)} |")
    add("")
    add("Methods (this script's name, the `common.METHODS` entry): " + "; ".join(
        f"`{n}` (`{METHODS[n]}`): {method(n).description}" for n in METHODS
        if any(r["method"] == n for r in rows)) + ".")
    add("")
    add("<!-- bench_peak rows (JSON, read by --merge):")
    for r in rows:
        add(json.dumps(r, sort_keys=True))
    add("-->")
    return "\n".join(L) + "\n"


def read_rows(path: str) -> list:
    if not os.path.exists(path):
        return []
    text = open(path).read()
    m = re.search(r"<!-- bench_peak rows \(JSON, read by --merge\):\n(.*?)\n-->", text, re.S)
    return [json.loads(ln) for ln in m.group(1).splitlines() if ln.strip()] if m else []


def select_cases(a) -> list:
    if a.cases:
        chosen = [Case.parse(c) for c in a.cases.split(",") if c.strip()]
    elif a.configs or a.methods:
        methods = a.methods.split(",") if a.methods else list(ISSUE_METHODS)
        for m in methods:
            if m not in METHODS:
                raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if a.configs:
            chosen = [Case(m, _config_name(c)) for c in a.configs.split(",") for m in methods]
        else:
            chosen = [c for c in map(Case.parse, cases.split(",")) if c.method in methods]
    else:
        chosen = [Case.parse(c) for c in cases.split(",")]
    for c in chosen:
        if a.seq:
            c.seq = a.seq
        if a.ckpt is not None:
            c.ckpt = a.ckpt == "on"
    return chosen


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None,
                   help=f"METHOD:CONFIG[:SEQ][:ckpt],...; default: {cases}")
    p.add_argument("--configs", default=None, help="configs (common.CONFIGS), comma-separated")
    p.add_argument("--methods", default=None, help=f"methods: {', '.join(METHODS)}")
    p.add_argument("--seq", type=int, default=None, help="sequence length for every case")
    p.add_argument("--ckpt", choices=("on", "off"), default=None,
                   help="activation checkpointing for every case (default: per case)")
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--rank", type=int, default=None, help="override the per-config rank")
    p.add_argument("--svd", choices=("exact", "randomized"), default=svd)
    p.add_argument("--svd-niter", type=int, default=None,
                   help="power iterations of the randomized SVD (-1: the package's default; "
                        f"default: {svd_niter} on cpu, {svd_niter_cuda} on cuda)")
    p.add_argument("--ec-iters", type=int, default=None,
                   help=f"LoQT error-compensation rounds (default: {ec_iters} on cpu, "
                        f"{ec_iters_cuda} on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=device,
                   help="cpu: peak RSS; cuda: torch.cuda.max_memory_allocated (see the "
                        "docstring)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--timeout", type=float, default=timeout, help="seconds per case")
    p.add_argument("--jobs", type=int, default=0,
                   help="cases run at once (default: 2 when every case's weights + state + "
                        "grads stay below 2 GB, else 1)")
    p.add_argument("--max-rss-gb", type=float, default=max_rss_gb)
    p.add_argument("--min-free-gb", type=float, default=min_free_gb)
    p.add_argument("--mmap-threshold", type=int, default=mmap_threshold,
                   help="bytes; set glibc's MALLOC_MMAP_THRESHOLD_ for the measured process "
                        "(0: glibc's default), so freed big temporaries go back to the system")
    p.add_argument("--out", default=None,
                   help=f"results file (default: {out}; with --device cuda: {out_cuda})")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in --out (replaced by new rows of the same case)")
    p.add_argument("--also", action="append", default=[], metavar="FILE",
                   help="also keep the rows of this results file (repeatable)")
    p.add_argument("--estimate-only", default=None, metavar="REASON",
                   help="do not run: add the cases' meta-count rows, with this reason")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if a.svd_niter is None:
        a.svd_niter = svd_niter_cuda if cuda else svd_niter
    if a.ec_iters is None:
        a.ec_iters = ec_iters_cuda if cuda else ec_iters
    if a.out is None:
        a.out = out_cuda if cuda else out
    if a.svd_niter < 0:
        a.svd_niter = None
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        try:
            res = run_one(Case.parse(a.one), a)
        except BaseException as e:  # the reason, for the parent's table (e.g. CUDA OOM)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print("ERROR " + json.dumps(f"{type(e).__name__}: {first}"), flush=True)
            raise
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    chosen = select_cases(a)
    argv_common = ["--threads", str(a.threads), "--steps", str(a.steps), "--svd", a.svd,
                   "--svd-niter", str(-1 if a.svd_niter is None else a.svd_niter),
                   "--ec-iters", str(a.ec_iters), "--batch", str(a.batch),
                   "--vocab", str(a.vocab), "--seed", str(a.seed), "--device", a.device]
    if a.rank:
        argv_common += ["--rank", str(a.rank)]
    t0 = time.time()
    load0 = os.getloadavg()[0]
    command = ("python benchmarks/bench_peak.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))).strip()
    old = read_rows(a.out) if a.merge else []
    for path in a.also:  # rows of other results files (e.g. runs written elsewhere)
        extra = read_rows(path)
        keys = {r["key"] for r in extra}
        old = [r for r in old if r["key"] not in keys] + extra
    other = [r["key"] for r in old if r.get("device", "cpu") != a.device]
    if other:  # a table is of one device: RSS and CUDA allocator peaks do not compare
        log(f"dropping rows of another device than {a.device}: {', '.join(other)}")
        old = [r for r in old if r.get("device", "cpu") == a.device]
    if os.path.dirname(a.out):
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
    rows = []

    def write():
        import torch

        import common as C
        keys = {r["key"] for r in rows}
        allrows = [r for r in old if r["key"] not in keys] + rows
        try:  # on cuda the measuring process reports it: the parent stays off the GPU
            bnb_v = next(r["env"]["bitsandbytes"] for r in allrows if r.get("env"))
        except StopIteration:
            try:
                import bitsandbytes as bnb
                bnb_v = bnb.__version__
            except ImportError:
                bnb_v = "not installed"
        for r in allrows:
            if "estimate" not in r:
                c = Case(**r["case"])
                r["estimate"] = estimate(c, c.method, r.get("rank") or case_rank(c, a), a)
        envs = [r["env"] for r in allrows if r.get("env")]
        env = envs[-1] if envs else {}  # cuda: what the (last) measuring process saw
        meta = {
            "command(s)": "; ".join(
                f"`{c}` ({d})" for c, d in {r.get("command", "(not recorded)"): r.get("date", "?")
                                            for r in allrows}.items()),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            + f" (this invocation: {time.time() - t0:.0f} s; each row's own date is beside its "
              "command, its wall time in the per-process table)",
            "versions": f"torch {torch.__version__}, bitsandbytes {bnb_v}, Python "
                        f"{platform.python_version()}, git {C.git_rev()}",
            "device": f"cpu ({C.cpu_name()}), {a.threads} torch thread(s), {os.cpu_count()} CPUs, "
                      f"{_meminfo_kb('MemTotal') / 2 ** 20:.1f} GiB RAM, no GPU; load average "
                      f"{load0:.2f} / {os.getloadavg()[0]:.2f} at the start / end of the last invocation "
                      "(a shared machine: other developers' jobs ran alongside)",
            "model": f"benchmarks/common.py LlamaLM (RMSNorm, RoPE, SwiGLU, untied head), "
                     f"vocabulary {a.vocab}, batch {a.batch}, bf16 activations and float "
                     "parameters, built on meta and converted block by block",
            "settings": f"svd={a.svd}, randomized-SVD power iterations "
                        f"{'package default (1)' if a.svd_niter is None else a.svd_niter}, "
                        f"LoQT ec_iters={a.ec_iters} (package default 5), LoQT update_proj_gap "
                        "100 (step 0 merges), scale 0.5; Q-GaLore update_proj_gap 500, scale "
                        "0.25, lr 0.004; stagger on (no second SVD at step 1); APOLLO-Mini "
                        "update_proj_gap 200, rank 1, scale √128, lr 0.01",
        }
        if a.device == "cuda":
            meta["versions"] = (
                f"torch {env.get('torch', torch.__version__)} (CUDA {env.get('cuda', '?')}), "
                f"bitsandbytes {env.get('bitsandbytes', bnb_v)}, Python "
                f"{env.get('python', platform.python_version())}, git {C.git_rev()}")
            meta["device"] = (
                (f"cuda: {env['gpu']} ({env['gpu_memory'] / GIB:.1f} GiB, compute capability "
                 f"{env['capability']})" if env else "cuda (no measuring process reported)")
                + f"; host {C.cpu_name()}, {os.cpu_count()} CPUs, "
                f"{_meminfo_kb('MemTotal') / 2 ** 20:.1f} GiB RAM, {a.threads} torch CPU "
                "thread(s)")
        with open(a.out, "w") as f:
            f.write(render(allrows, meta, a.device))

    ests = [estimate(c, c.method, case_rank(c, a), a) for c in chosen]
    bounds = [e["weights"]["total"] + e["state"] + e["grads"] for e in ests]
    # small cases (the smoke test) two at a time; anything big strictly one at a time
    jobs = a.jobs or (2 if max(bounds, default=0) < SMALL_BOUND else 1)

    def one(i: int) -> dict:
        import common as C

        case = chosen[i]
        if a.estimate_only:
            row = dict(case=asdict(case), key=case.key, method=case.method,
                       error=f"not run: {a.estimate_only}", estimate_only=True,
                       max_rss_seen=None)
        else:
            row = run_case(case, a, argv_common)
        row["estimate"], row["command"] = ests[i], command
        row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        row["git"] = C.git_rev()
        return row

    if jobs > 1 and len(chosen) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(jobs) as pool:
            rows.extend(pool.map(one, range(len(chosen))))
        write()
    else:
        for i in range(len(chosen)):
            rows.append(one(i))
            write()
    log(f"wrote {a.out}")
    print(open(a.out).read())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
