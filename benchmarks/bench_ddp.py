"""DDP: replicas stay identical, and the peak memory of normal vs per-layer stepping.

    python benchmarks/bench_ddp.py                 # 2 ranks on CPU (gloo), writes results/ddp.md
    python benchmarks/bench_ddp.py --layers=8 --width=512 --out=/tmp/ddp.md

Each configuration runs in a fresh pair of processes (``torch.multiprocessing`` spawn,
``gloo``, one thread each) that train a stack of ``--layers`` Linear(width, width) layers
(GELU between, MSE to a fixed target, each rank its own random batches) under
``DistributedDataParallel`` with the default bucket cap (25 MB; first bucket 1 MB):

* methods: ``GaLoreAdamW`` (float weights, every gradient in DDP's buckets) and, when
  ``QGaLoreAdamW8bit`` on INT8 weights (their float32 gradients are in DDP's buckets too);
* stepping: ``opt.step()`` vs per-layer ``opt.register_hooks(ddp_model)``;
* ``gradient_as_bucket_view`` False (DDP's default) and True.

Memory is measured as in ``bench_step.py``: peak RSS (VmHWM from /proc/self/status, reset
through /proc/self/clear_refs) during the iterations, minus the RSS when they start
(model, DDP with its bucket buffers and optimizer exist; the code of forward, backward
and step was paged in by a throwaway copy), with ``MALLOC_MMAP_THRESHOLD_=131072`` so
that freed tensors go back to the system and RSS follows live memory. DDP's first backward reduces every gradient in
one bucket (it records the order in which gradients arrive, and rebuilds its buckets in
the second forward), so the first iteration and the iterations from the third on
(``--steps`` - 2 of them, the steady state) are reported separately. Gradient bytes: ``G`` = gradients in
DDP's buckets (``Q`` of them: INT8 weights' gradients), bucket layout as counted by a communication
hook in the normal-stepping run. At the end, every rank's parameters and buffers are
compared with rank 0's (max |Δ|; 0 means bit-identical).
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import shlex
import socket
import sys

# -------------------------------------------------------------------------------------
# defaults
layers = 16
width = 1024
batch = 16
steps = 5
rank = 64
world = 2
out = "benchmarks/results/ddp.md"
# -------------------------------------------------------------------------------------

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C
import lowrank_optim as lo

MB = 2 ** 20


def _model(quantized: bool) -> nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*mods[:-1])
    if quantized:
        lo.quantize_weights(model, bits=8, group_size=256, target_modules=None)
    return model


_SETTINGS = ("layers", "width", "batch", "steps", "rank", "world")


def _worker(r: int, port: int, cfg: dict, results) -> None:
    # a spawned rank imports this module afresh: take the parent's settings, not the defaults
    globals().update({k: cfg[k] for k in _SETTINGS})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                            world_size=world)
    model = _model(cfg["method"] == "q_galore")
    ddp = DDP(model, gradient_as_bucket_view=cfg["bucket_view"])
    cls = lo.QGaLoreAdamW8bit if cfg["method"] == "q_galore" else lo.GaLoreAdamW
    opt = cls(ddp.parameters(), lr=1e-3, rank=rank, update_proj_gap=200, svd="randomized")
    buckets = []
    if cfg["per_layer"]:
        opt.register_hooks(ddp)
    else:  # count the buckets (a plain averaging hook: the memory pattern is DDP's own)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting_hook)
    gen = torch.Generator().manual_seed(100 + r)
    # page in the code of forward, backward and step on a throwaway copy, so that the first
    # iteration's figure is not library code
    scratch = copy.deepcopy(model)
    scratch_opt = cls(scratch.parameters(), lr=1e-3, rank=rank, svd="randomized")
    scratch(torch.randn(batch, width)).square().mean().backward()
    scratch_opt.step()
    del scratch, scratch_opt
    cpu = torch.device("cpu")
    meter, peaks = C.MemoryMeter(cpu), []
    for step in range(steps):
        if step in (0, 2):  # DDP rebuilds its buckets in the 2nd forward
            C.release_memory(cpu)
            meter.start()
        buckets.clear()
        ddp(torch.randn(batch, width, generator=gen)).square().mean().backward()
        if not cfg["per_layer"]:
            opt.step()
            opt.zero_grad()
        if step in (0, steps - 1):
            peaks.append(meter.peak() - meter.baseline)
    diff = lo.distributed.replica_divergence(model)
    if r == 0:
        g = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        q = sum(4 * p.numel() for p in model.parameters() if isinstance(p, lo.nn.QuantWeight))
        results.put(dict(cfg, first=peaks[0], steady=peaks[1], diff=diff, G=g, Q=q,
                         buckets=list(buckets)))
    dist.destroy_process_group()


def run(cfg: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    settings = {k: globals()[k] for k in _SETTINGS}
    mp.spawn(_worker, args=(port, dict(cfg, **settings), results), nprocs=world)
    return {k: v for k, v in results.get().items() if k not in settings}


def render(rows: list, cmd: str, date: str) -> str:
    L = ["# bench_ddp: DistributedDataParallel, normal vs per-layer stepping\n",
         f"- command: `{cmd}`", f"- date: {date}",
         f"- torch {torch.__version__}, lowrank_optim {lo.__version__} (git {C.git_rev()}), Python "
         f"{platform.python_version()}; device: cpu, {world} ranks (gloo), 1 thread each, "
         f"{os.cpu_count()} CPUs",
         f"- model: {layers} × Linear({width}, {width}), batch {batch} per rank, {steps} steps, "
         f"rank {rank} (randomized SVD); peak RSS above the RSS at the start of the "
         "iterations (MALLOC_MMAP_THRESHOLD_=131072); rank 0's figures", ""]
    steps_of = {(r["method"], r["bucket_view"]): r for r in rows if not r["per_layer"]}
    L.append("| method | gradient_as_bucket_view | stepping | max \\|Δ\\| across ranks | "
             "peak, 1st iteration (MB) | peak, iterations 3+ (MB) | saving vs opt.step() (MB) |")
    L.append("|---|---|---|---|---|---|---|")
    for r in rows:
        normal = steps_of[(r["method"], r["bucket_view"])]
        saving = "" if not r["per_layer"] else f"{(normal['steady'] - r['steady']) / MB:.1f}"
        L.append(f"| {r['method']} | {r['bucket_view']} | "
                 f"{'per-layer' if r['per_layer'] else 'opt.step()'} | {r['diff']:.3g} | "
                 f"{r['first'] / MB:.1f} | {r['steady'] / MB:.1f} | {saving} |")
    L.append("")
    for (method, bv), r in steps_of.items():
        if bv:
            continue
        big = max(r["buckets"], default=0)
        L.append(f"- {method}: G = {r['G'] / MB:.1f} MB of gradients in DDP buckets "
                 f"({len(r['buckets'])} buckets after the rebuild, largest {big / MB:.1f} MB), "
                 f"of which {r['Q'] / MB:.1f} MB for INT8 weights. Expected saving of per-layer "
                 f"mode with gradient_as_bucket_view=False, iterations 3+: about G − largest "
                 f"bucket = {(r['G'] - big) / MB:.1f} MB.")
    return "\n".join(L) + "\n"


def main() -> None:
    for arg in sys.argv[1:]:
        if arg in ("-h", "--help"):
            print(__doc__)
            return
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in (*_SETTINGS, "out") or not value:
            sys.exit(f"bench_ddp.py: expected --name=value, name one of "
                     f"{', '.join((*_SETTINGS, 'out'))}; got {arg!r}")
        globals()[key] = type(globals()[key])(value)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the spawned ranks' malloc
    methods = ["galore", "q_galore"]
    rows = []
    for method in methods:
        for bucket_view in (False, True):
            for per_layer in (False, True):
                rows.append(run(dict(method=method, bucket_view=bucket_view,
                                     per_layer=per_layer)))
                r = rows[-1]
                print(f"{method} bucket_view={bucket_view} per_layer={per_layer}: "
                      f"Δ {r['diff']:.3g}, peak 1st {r['first'] / MB:.1f} MB, "
                      f"later {r['steady'] / MB:.1f} MB", flush=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = render(rows, cmd, datetime.datetime.now().isoformat(timespec="seconds"))
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
