"""GaLore with a low-rank backward (``lo.prepare_galore``) against torch AdamW and normal
GaLore, side by side on the LLaMA-60M shapes (issue #20): whole training step time, peak
memory, bytes all-reduced under DDP, and the cost of a refresh. What each part does:
``docs/benchmarks.md``.

    python benchmarks/bench_lowrank_backward.py --threads 1 --rounds 14 --refresh-cost
    python benchmarks/bench_lowrank_backward.py --quick          # micro config, seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from _paths import HERE  # puts the checkout's package first on sys.path

import torch

from common import (LlamaLM, MemoryMeter, MethodArgs, device_name, get_config, md_table,
                    method, parser, release_memory, report_meta, sync, write_report)

TIME_METHODS = ("adamw", "adamw_fused", "galore", "lowrank")
MEM_METHODS = ("adamw", "galore", "galore_per_layer", "lowrank", "lowrank_per_layer")
DDP_METHODS = ("adamw", "galore", "lowrank")
TARGETS = ("attn", "mlp")  # GaLore projects these; embedding, norms and head are plain Adam


# this benchmark's methods as specs of the one registry (common.METHODS); every GaLore
# refreshes all its bases at the same steps (no stagger), so a refresh step is measurable
SPECS = {"adamw": "adamw", "adamw_fused": "adamw_fused", "galore": "galore+stagger=False",
         "galore_per_layer": "galore_per_layer+stagger=False",
         "lowrank": "galore_lowrank+stagger=False",
         "lowrank_per_layer": "galore_lowrank+stagger=False"}


def build(name: str, args, device):
    """(model, optimizer, hooks handle) of ``name`` (:data:`SPECS`), seeded identically."""
    m = method(SPECS[name])
    if name.endswith("per_layer"):
        m = dataclasses.replace(m, per_layer=True)
    torch.manual_seed(0)
    model = LlamaLM(get_config(args.config, vocab_size=args.vocab, seq_len=args.seq)).to(device)
    return m.build(model, MethodArgs(lr=m.lr, rank=args.rank, update_proj_gap=args.gap,
                                     target_modules=TARGETS))


def batch(args, device, gen):
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    return idx[:, :-1], idx[:, 1:]


def train_step(model, opt, hooks, data, device) -> tuple[float, float]:
    """One training step; returns (forward + backward, optimizer step) in seconds."""
    sync(device)
    t0 = time.perf_counter()
    model(*data).backward()
    sync(device)
    t1 = time.perf_counter()
    if hooks is None:
        opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def part_time(args, device) -> str:
    """Every method's model in one process; each round times one step of each, in an order
    rotated from round to round; at round 1 + rounds // 2 every GaLore basis is made due."""
    runs = {m: build(m, args, device) for m in TIME_METHODS}
    steady = {m: [] for m in TIME_METHODS}  # (forward + backward, optimizer step)
    first, refresh = {}, {}
    gen = torch.Generator().manual_seed(1)
    k = len(TIME_METHODS)
    for r in range(1 + args.rounds):
        data = batch(args, device, gen)
        shown = {}
        for m in TIME_METHODS[r % k:] + TIME_METHODS[:r % k]:
            model, opt, hooks = runs[m]
            due = r == 1 + args.rounds // 2 and not m.startswith("adamw")
            if due:
                for st in opt.state.values():
                    if "refresh_next" in st:
                        st["refresh_next"] = st["step"]
            parts = train_step(model, opt, hooks, data, device)
            shown[m] = sum(parts)
            (first if r == 0 else refresh if due else {}).__setitem__(m, sum(parts))
            if r and not due:
                steady[m].append(parts)
        print(f"round {r}: " + ", ".join(f"{m} {t:.3f}s" for m, t in shown.items()), flush=True)
    med = {m: statistics.median(sum(x) for x in steady[m]) for m in TIME_METHODS}
    amort = {m: med[m] + (refresh[m] - med[m]) / args.gap if m in refresh else med[m]
             for m in TIME_METHODS}
    fast = {m: min(sum(x) for x in steady[m]) + amort[m] - med[m] for m in TIME_METHODS}
    rows = [[m, f"{med[m]:.3f}", f"{refresh[m]:.3f}" if m in refresh else "-",
             f"{amort[m]:.3f}", f"{args.batch * args.seq / amort[m]:.0f}",
             f"{amort['adamw'] / amort[m]:.3f}x", f"{amort['adamw_fused'] / amort[m]:.3f}x",
             f"{amort['galore'] / amort[m]:.3f}x", f"{fast['adamw'] / fast[m]:.3f}x",
             " / ".join(f"{statistics.median(x[i] for x in steady[m]):.3f}" for i in (0, 1))]
            for m in TIME_METHODS]
    return md_table(["method", "steady step (s)", "refresh step (s)", "amortized step (s)",
                     "tokens/s", "vs AdamW", "vs AdamW fused", "vs GaLore",
                     "vs AdamW, fastest steps", "fwd+bwd / opt step (s)"], rows) + (
        f"\n\n`adamw` is torch.optim.AdamW's default (foreach), `adamw_fused` with "
        f"`fused=True`. {args.rounds} timed rounds ({args.rounds - 1} steady + 1 all-refresh); "
        "amortized = steady median + (refresh step − steady) / gap; the fastest-steps column "
        "uses each method's fastest steady step (other load only adds time). First step "
        "(every basis's first SVD): " + ", ".join(f"{m} {t:.2f}s" for m, t in first.items()) +
        ".\n")


def mem_child(args, device) -> None:
    import lowrank_optim  # noqa: F401 - part of the runtime, before the baseline
    gen = torch.Generator().manual_seed(1)
    data = [batch(args, device, gen) for _ in range(args.mem_steps)]
    meter = MemoryMeter(device)
    release_memory(device)
    meter.start()
    base = meter.baseline  # the runtime: everything from here on is the method's
    model, opt, hooks = build(args.child, args, device)
    train_step(model, opt, hooks, data[0], device)  # every basis's first refresh
    first = meter.peak() - base
    release_memory(device)
    meter.reset()  # from here on: ordinary steps
    for d in data[1:]:
        train_step(model, opt, hooks, d, device)
    steady = meter.peak() - base
    print(json.dumps({"peak": max(first, steady), "steady": steady}))


def part_memory(args, device) -> str:
    """Each method in its own subprocess (``MALLOC_MMAP_THRESHOLD_`` so freed tensors go back
    to the system): the peak above the runtime over ``--mem-steps`` steps, and without the
    first (which refreshes every basis)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("config", "vocab", "batch", "seq", "rank", "gap", "threads", "mem_steps", "device")]
    res = {}
    for m in MEM_METHODS:
        out = subprocess.run([sys.executable, __file__, "--child", m, *passed], env=env,
                             capture_output=True, text=True, check=True).stdout
        res[m] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {m}: {res[m]}", flush=True)
    ref = res["galore_per_layer"]["steady"]
    rows = [[m, f"{res[m]['peak'] / 2 ** 20:.1f}", f"{res[m]['steady'] / 2 ** 20:.1f}",
             f"{res[m]['steady'] / ref:.3f}x"] for m in MEM_METHODS]
    return md_table(["method", "peak incl. refresh step (MiB)", "steady peak (MiB)",
                     "vs galore_per_layer (steady)"], rows) + (
        f"\n\nPeak above the runtime (torch imported, data made): weights, optimizer state, "
        f"gradients, activations; {MemoryMeter(device).kind}; {args.mem_steps} steps.\n")


def _counting_allreduce(counted: list, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counted.append(bucket.buffer().numel() * bucket.buffer().element_size())
    return allreduce_hook(None, bucket)


def _ddp_worker(rank: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=600))
    small = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 32})  # bytes don't depend on it
    res = {}
    for m in DDP_METHODS:
        model, opt, _ = build(m, small, torch.device("cpu"))
        ddp, counted = DDP(model), []
        ddp.register_comm_hook(counted, _counting_allreduce)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            ddp(*batch(small, torch.device("cpu"), gen)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        trained = [(n, p.numel() * p.element_size()) for n, p in model.named_parameters()
                   if p.requires_grad]
        res[m] = dict(counted=sum(counted) / 2, expected=sum(b for _, b in trained),
                      blocks=sum(b for n, b in trained if n.startswith("layers.")))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def part_ddp(args) -> str:
    """Two gloo processes; a communication hook counts the bytes of every bucket."""
    import tempfile
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_ddp_worker, args=(port, args, f"{tmp}/ddp.json"), nprocs=2,
                           start_method="spawn")
        with open(f"{tmp}/ddp.json") as f:
            res = json.load(f)
    a = res["adamw"]
    for r in res.values():
        assert r["counted"] == r["expected"], r  # DDP reduces exactly the trained gradients
    rows = [[m, f"{r['counted'] / 2 ** 20:.2f}", f"{r['counted'] / a['counted']:.3f}x",
             f"{r['blocks'] / 2 ** 20:.2f}", f"{r['blocks'] / a['blocks']:.3f}x"]
            for m, r in res.items()]
    return md_table(["method", "bytes all-reduced per step (MiB)", "vs AdamW",
                     "of which the transformer blocks (MiB)", "blocks vs AdamW's"], rows) + (
        "\n\nDDP's buckets counted by a communication hook (equal to the bytes of the trained "
        "parameters' gradients); the blocks are everything but embedding, final norm and "
        "head.\n")


def _sketch_basis(d, x, rank: int, oversample: int = 8):
    """The randomized SVD (one power iteration) of G = dᵀx from activations only."""
    omega = torch.randn(x.shape[1], rank + oversample, generator=torch.Generator().manual_seed(0))
    y = torch.linalg.qr(d.T @ (x @ omega)).Q                       # range of G·Ω (m×q)
    y = torch.linalg.qr(d.T @ (x @ torch.linalg.qr(x.T @ (d @ y)).Q)).Q  # one power iteration
    u, _, vh = torch.linalg.svd((x.T @ (d @ y)).T, full_matrices=False)  # Yᵀ G
    return (y @ u)[:, :rank], vh[:rank].T


def part_refresh_cost(args) -> str:
    """Per matrix shape, with b tokens of random X (b×n) and dY (b×m): the dense gradient
    dYᵀX then the exact or randomized SVD, against the sketch built from activations."""
    from lowrank_optim.projector import compute_basis

    torch.manual_seed(0)
    cfg = get_config(args.config)
    shapes = {"q/k/v/o": ((cfg.dim, cfg.dim), 4), "gate/up": ((cfg.mlp_hidden, cfg.dim), 2),
              "down": ((cfg.dim, cfg.mlp_hidden), 1)}
    b, rows, totals = args.batch * args.seq, [], [0.0, 0.0, 0.0]

    def best(fn):
        out = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    for name, ((m, n), count) in shapes.items():
        d, x = torch.randn(b, m), torch.randn(b, n)
        t = [best(lambda: compute_basis(d.T @ x, args.rank, "exact")),
             best(lambda: compute_basis(d.T @ x, args.rank, "randomized")),
             best(lambda: _sketch_basis(d, x, args.rank))]
        totals = [tot + v * count * cfg.n_layers for tot, v in zip(totals, t)]
        rows.append([f"{name} {m}×{n}", count, *(f"{v * 1e3:.1f}" for v in t)])
    rows.append([f"all {cfg.n_layers * 7} matrices (s)", "", *(f"{v:.2f}" for v in totals)])
    return md_table(["shape (m×n)", "per layer", "dense dYᵀX + exact SVD (ms)",
                     "dense + randomized (ms)", "sketch from activations (ms)"], rows) + (
        f"\n\n{b} tokens, rank {args.rank}, best of 3; per step at gap {args.gap}: divide by "
        f"{args.gap}.\n")


def main() -> None:
    args = parser(__doc__, config="60m", vocab=32000, batch=2, seq=256, rank=128, gap=200,
                  rounds=8, mem_steps=3, threads=1, device="cpu", note="", out="", child="",
                  skip_time=False, skip_memory=False, skip_ddp=False, refresh_cost=False,
                  quick=False).parse_args()
    if args.quick:
        args.config, args.vocab, args.seq, args.rank, args.rounds = "micro", 256, 64, 16, 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        return mem_child(args, device)
    parts = [("Training step time (forward + backward + optimizer)", not args.skip_time,
              lambda: part_time(args, device)),
             ("Peak memory", not args.skip_memory, lambda: part_memory(args, device)),
             ("DDP: bytes all-reduced per step", not args.skip_ddp, lambda: part_ddp(args)),
             ("Refresh: dense gradient vs sketch from activations", args.refresh_cost,
              lambda: part_refresh_cost(args))]
    body = "".join(f"\n## {title}\n\n{run()}" for title, on, run in parts if on)
    meta = report_meta("bench_lowrank_backward.py", None, device_name(device),
                       setup=f"LlamaLM {args.config}, vocabulary {args.vocab}, batch "
                             f"{args.batch}x{args.seq} tokens, rank {args.rank}, gap "
                             f"{args.gap}, GaLore on {', '.join(TARGETS)}")
    if args.note:
        meta["note"] = args.note
    out = args.out or HERE / "results" / f"lowrank_backward{'_quick' if args.quick else ''}.md"
    print(write_report(out, "GaLore with a low-rank backward (issue #20)", meta, body))


if __name__ == "__main__":
    main()
