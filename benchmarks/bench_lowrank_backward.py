"""GaLore with a low-rank backward (``lo.prepare_galore``) against torch AdamW and normal
GaLore, side by side on the LLaMA-60M shapes (issue #20).

Model: ``benchmarks/common.py``'s ``LlamaLM`` at ``--config`` (default ``60m``: hidden 512,
intermediate 1376, 8 layers, 8 heads) with the papers' vocabulary (``--vocab 32000``: 58M
parameters), trained on random tokens (``--batch 2 --seq 256``). GaLore projects the
attention and MLP matrices (``lo.param_groups(model, target_modules=("attn", "mlp"))``:
rank 128, ``update_proj_gap`` 200, scale 0.25, ``stagger=False``); embedding, norms and
head are plain AdamW in every method. Methods:

* ``adamw``: ``torch.optim.AdamW`` (its default, foreach) on every parameter;
* ``galore``: ``GaLoreAdamW``, normal stepping;
* ``galore_per_layer``: the same stepped inside backward (``opt.register_hooks(model)``);
* ``lowrank``: ``lo.prepare_galore(model, rank, target_modules=("attn", "mlp"))`` then the
  same ``GaLoreAdamW``, normal stepping (global clipping stays available);
* ``lowrank_per_layer``: the same stepped inside backward.

Part 1, time (``adamw``, ``galore``, ``lowrank``; ``--threads``, default 1): one process
holds every method's model and optimizer; each round times one whole training step
(forward, backward, ``opt.step()``, ``zero_grad``) of every method, in an order rotated
from round to round, so a noisy stretch of a shared machine hits all alike. Step 0 (the
first refresh of every basis, state allocation) is the warm-up; at round ``1 + rounds // 2``
every GaLore basis is made due again (its ``refresh_next`` set to the current step): the
time of that all-refresh step minus the steady median, divided by the gap, is the refresh
cost per step (with ``stagger`` the same SVDs are spread over the gap instead). Reported:
steady median step time, refresh step, amortized step time (steady + refresh extra /
gap), tokens/s, and ratios to AdamW and to normal GaLore; also the ratio to AdamW from the
fastest steady step of each method (other load on a shared machine only adds time).

Part 2, peak memory: each method in its own subprocess (``MALLOC_MMAP_THRESHOLD_=131072``
so freed tensors return to the system); the peak RSS (VmHWM, reset through
``/proc/self/clear_refs`` after the model and optimizer are built; on CUDA
``max_memory_allocated``) above that point, over ``--mem-steps`` steps (step 0 refreshes
every basis), and the same for the steps after the first (steady).

Part 3, DDP bytes all-reduced per step: two gloo processes on the CPU, each method's model
wrapped in ``DistributedDataParallel`` with a communication hook that counts the bytes of
every bucket it all-reduces (then DDP's own all-reduce); a batch of 1x32 tokens (the bytes
do not depend on it), averaged over 2 steps.

Part 4 (``--refresh-cost``), the design choice of a refresh: for each matrix shape of the
model, with ``b`` tokens of random activations ``X`` (b×n) and output gradients ``dY``
(b×m), the time of (a) the dense gradient ``dYᵀX`` then the package's exact SVD
(``compute_basis``), (b) the dense gradient then its randomized SVD, (c) the randomized
SVD's range finder built from activations only (``G·Ω = dYᵀ(X·Ω)``, one power iteration
``Gᵀ·Y = Xᵀ(dY·Y)``, ``Bᵀ = Xᵀ(dY·Y)`` then the SVD of the small factor), summed over the
model's matrices.

Command lines (repository root):

    python benchmarks/bench_lowrank_backward.py --threads 1          # everything, ~10 min on 1 core
    python benchmarks/bench_lowrank_backward.py --quick              # micro config, seconds
    python benchmarks/bench_lowrank_backward.py --skip-memory --skip-ddp --rounds 12
    python benchmarks/bench_lowrank_backward.py --refresh-cost --skip-time --skip-memory --skip-ddp

Results are printed as Markdown and written with versions, device, threads, date and the
command line to ``--out`` (default ``benchmarks/results/lowrank_backward.md``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time

from _paths import HERE, ROOT  # puts the checkout's package first on sys.path

import torch

from common import LlamaLM, get_config

TIME_METHODS = ("adamw", "galore", "lowrank")
MEM_METHODS = ("adamw", "galore", "galore_per_layer", "lowrank", "lowrank_per_layer")
DDP_METHODS = ("adamw", "galore", "lowrank")


# ---- building ---------------------------------------------------------------------------

def build(method: str, args, device):
    """(model, optimizer, hooks handle) of ``method``, seeded identically."""
    import lowrank_optim as lo

    torch.manual_seed(0)
    cfg = get_config(args.config, vocab_size=args.vocab, seq_len=args.seq)
    model = LlamaLM(cfg).to(device)
    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), None
    targets = ("attn", "mlp")
    if method.startswith("lowrank"):
        lo.prepare_galore(model, rank=args.rank, target_modules=targets)
    groups = lo.param_groups(model, rank=args.rank, target_modules=targets,
                             update_proj_gap=args.gap, scale=0.25)
    opt = lo.GaLoreAdamW(groups, lr=1e-2, stagger=False)
    hooks = opt.register_hooks(model) if method.endswith("per_layer") else None
    return model, opt, hooks


def batch(args, device, gen):
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    idx = idx.to(device)
    return idx[:, :-1], idx[:, 1:]


def train_step(model, opt, hooks, data, device=None) -> float:
    """One training step; returns the seconds forward + backward took (the rest is
    ``opt.step()`` and ``zero_grad``)."""
    t0 = time.perf_counter()
    model(*data).backward()
    if device is not None:
        sync(device)
    t1 = time.perf_counter()
    if hooks is None:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def force_refresh(opt) -> int:
    """Make every projected basis due at its next step; returns how many."""
    n = 0
    for st in opt.state.values():
        if "refresh_next" in st:
            st["refresh_next"] = st["step"]
            n += 1
    return n


# ---- part 1: time -----------------------------------------------------------------------

def part_time(args, device) -> str:
    runs = {m: build(m, args, device) for m in TIME_METHODS}
    times = {m: [] for m in TIME_METHODS}
    parts = {m: [] for m in TIME_METHODS}  # (forward + backward, step) of steady rounds
    refresh_t, first_t = {}, {}
    gen = torch.Generator().manual_seed(1)
    refresh_round = 1 + args.rounds // 2
    shown = {}
    for r in range(1 + args.rounds):
        data = batch(args, device, gen)
        order = TIME_METHODS[r % 3:] + TIME_METHODS[:r % 3]
        for m in order:
            model, opt, hooks = runs[m]
            if r == refresh_round and m != "adamw":
                assert force_refresh(opt) > 0
            sync(device)
            t0 = time.perf_counter()
            fwd_bwd = train_step(model, opt, hooks, data, device)
            sync(device)
            dt = time.perf_counter() - t0
            shown[m] = dt
            if r == 0:
                first_t[m] = dt
            elif r == refresh_round and m != "adamw":
                refresh_t[m] = dt
            else:
                times[m].append(dt)
                parts[m].append((fwd_bwd, dt - fwd_bwd))
        print(f"round {r}: " + ", ".join(f"{m} {shown[m]:.3f}s" for m in TIME_METHODS),
              flush=True)
    tokens = args.batch * args.seq
    steady = {m: statistics.median(times[m]) for m in TIME_METHODS}
    amort = {m: steady[m] + (refresh_t[m] - steady[m]) / args.gap if m in refresh_t
             else steady[m] for m in TIME_METHODS}
    # the fastest steady step: on a shared machine other load only ever adds time
    fast = {m: min(times[m]) + (amort[m] - steady[m]) for m in TIME_METHODS}
    rows = ["| method | steady step (s) | refresh step (s) | amortized step (s) | tokens/s "
            "| vs AdamW | vs GaLore | vs AdamW, fastest steps |", "|---|---|---|---|---|---|---|---|"]
    for m in TIME_METHODS:
        refresh = f"{refresh_t[m]:.3f}" if m in refresh_t else "-"
        rows.append(f"| {m} | {steady[m]:.3f} | {refresh} | {amort[m]:.3f} | "
                    f"{tokens / amort[m]:.0f} | {amort['adamw'] / amort[m]:.3f}x | "
                    f"{amort['galore'] / amort[m]:.3f}x | {fast['adamw'] / fast[m]:.3f}x |")
    spread = {m: (min(times[m]), max(times[m])) for m in TIME_METHODS}
    split = {m: tuple(statistics.median(x[i] for x in parts[m]) for i in (0, 1))
             for m in TIME_METHODS}
    note = (f"\n{args.rounds} timed rounds ({args.rounds - 1} steady + 1 all-refresh), first "
            f"step (warm-up, every basis's first SVD): " +
            ", ".join(f"{m} {first_t[m]:.2f}s" for m in TIME_METHODS) + "; steady min-max: " +
            ", ".join(f"{m} {a:.3f}-{b:.3f}" for m, (a, b) in spread.items()) +
            "; steady medians of forward + backward / optimizer step: " +
            ", ".join(f"{m} {a:.3f} / {b:.3f}" for m, (a, b) in split.items()) + " s.\n")
    return "\n".join(rows) + "\n" + note


# ---- part 2: peak memory (one subprocess per method) ----------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peak:
    def __init__(self, device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kb("VmRSS") * 1024

    def above(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def mem_child(args, device) -> None:
    torch.set_num_threads(args.threads)
    import lowrank_optim  # noqa: F401 - imported before the baseline
    gen = torch.Generator().manual_seed(1)
    data = [batch(args, device, gen) for _ in range(args.mem_steps)]
    peak = Peak(device)
    peak.reset()
    base = peak.base  # the runtime: everything from here on is the method's
    model, opt, hooks = build(args.child, args, device)
    train_step(model, opt, hooks, data[0])
    first = peak.above()
    peak.reset()  # from here on: ordinary steps, every basis already computed
    for d in data[1:]:
        train_step(model, opt, hooks, d)
    steady = peak.above() + peak.base - base
    total = max(first, steady)
    print(json.dumps({"peak": total, "steady": steady}))


def part_memory(args, device) -> str:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    res = {}
    for m in MEM_METHODS:
        cmd = [sys.executable, __file__, "--child", m] + _pass_through(args)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        res[m] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {m}: {res[m]}", flush=True)
    mib = lambda b: f"{b / 2 ** 20:.1f}"
    rows = ["| method | peak incl. refresh step (MiB) | steady peak (MiB) | vs galore_per_layer "
            "(steady) |", "|---|---|---|---|"]
    ref = res["galore_per_layer"]["steady"]
    for m in MEM_METHODS:
        rows.append(f"| {m} | {mib(res[m]['peak'])} | {mib(res[m]['steady'])} | "
                    f"{res[m]['steady'] / ref:.3f}x |")
    return "\n".join(rows) + (
        f"\n\nPeak memory above the runtime (torch imported, data made): weights, "
        f"optimizer state, gradients, activations, "
        f"{'max_memory_allocated' if device.type == 'cuda' else 'VmHWM'}; {args.mem_steps} "
        "steps, the first refreshing every basis.\n")


def _pass_through(args) -> list[str]:
    return ["--config", args.config, "--vocab", str(args.vocab), "--batch", str(args.batch),
            "--seq", str(args.seq), "--rank", str(args.rank), "--gap", str(args.gap),
            "--threads", str(args.threads), "--mem-steps", str(args.mem_steps),
            "--device", args.device]


# ---- part 3: DDP bytes -----------------------------------------------------------------

def _counting_allreduce(state: list, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buf = bucket.buffer()
    state.append(buf.numel() * buf.element_size())
    return allreduce_hook(None, bucket)


def _ddp_worker(rank: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=600))
    small = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 32})
    res = {}
    for m in DDP_METHODS:
        model, opt, _ = build(m, small, torch.device("cpu"))
        ddp = DDP(model)
        counted: list = []
        ddp.register_comm_hook(counted, _counting_allreduce)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            loss = ddp(*batch(small, torch.device("cpu"), gen))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        trained = [(n, p.numel() * p.element_size()) for n, p in model.named_parameters()
                   if p.requires_grad]
        res[m] = dict(counted=sum(counted) / 2, expected=sum(b for _, b in trained),
                      blocks=sum(b for n, b in trained if n.startswith("layers.")))
        del model, opt, ddp
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def part_ddp(args) -> str:
    import tempfile
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/ddp.json"
        mp.start_processes(_ddp_worker, args=(port, args, out), nprocs=2, start_method="spawn")
        with open(out) as f:
            res = json.load(f)
    rows = ["| method | bytes all-reduced per step (MiB) | vs AdamW | of which the transformer "
            "blocks (MiB) | blocks vs AdamW's |", "|---|---|---|---|---|"]
    for m in DDP_METHODS:
        r, a = res[m], res["adamw"]
        assert r["counted"] == r["expected"], r  # DDP reduces exactly the trained gradients
        rows.append(f"| {m} | {r['counted'] / 2 ** 20:.2f} | {r['counted'] / a['counted']:.3f}x"
                    f" | {r['blocks'] / 2 ** 20:.2f} | {r['blocks'] / a['blocks']:.3f}x |")
    return "\n".join(rows) + (
        "\n\nTwo gloo processes, DDP's buckets counted by a communication hook (equal to the "
        "bytes of the trained parameters' gradients); the blocks are everything but "
        "embedding, final norm and head (attention and MLP matrices, norms).\n")


# ---- part 4: refresh cost, dense gradient vs sketch from activations --------------------

def _sketch_basis(d: torch.Tensor, x: torch.Tensor, rank: int, oversample: int = 8,
                  seed: int = 0):
    """The randomized SVD (one power iteration) of G = dᵀx from activations only."""
    n = x.shape[1]
    q = rank + oversample
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, q, generator=gen)
    basis = torch.linalg.qr(d.T @ (x @ omega)).Q                 # range of G·Ω (m×q)
    z = torch.linalg.qr(x.T @ (d @ basis)).Q                     # Gᵀ·Y (n×q)
    basis = torch.linalg.qr(d.T @ (x @ z)).Q                     # G·Z
    bt = x.T @ (d @ basis)                                       # (Yᵀ G)ᵀ, n×q
    u, _, vh = torch.linalg.svd(bt.T, full_matrices=False)
    return (basis @ u)[:, :rank], vh[:rank].T


def part_refresh_cost(args) -> str:
    from lowrank_optim.projector import compute_basis

    torch.manual_seed(0)
    cfg = get_config(args.config)
    shapes = {"q/k/v/o": ((cfg.dim, cfg.dim), 4), "gate/up": ((cfg.mlp_hidden, cfg.dim), 2),
              "down": ((cfg.dim, cfg.mlp_hidden), 1)}
    b = args.batch * args.seq
    rows = [f"| shape (m×n) | per layer | dense dYᵀX + exact SVD (ms) | dense + randomized "
            f"(ms) | sketch from activations (ms) |", "|---|---|---|---|---|"]
    totals = [0.0, 0.0, 0.0]

    def best(fn, reps=3):
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return min(out)

    for name, ((m, n), count) in shapes.items():
        d, x = torch.randn(b, m), torch.randn(b, n)
        t = [best(lambda: compute_basis(d.T @ x, args.rank, "exact")),
             best(lambda: compute_basis(d.T @ x, args.rank, "randomized")),
             best(lambda: _sketch_basis(d, x, args.rank))]
        for i in range(3):
            totals[i] += t[i] * count * cfg.n_layers
        rows.append(f"| {name} {m}×{n} | {count} | " + " | ".join(f"{v * 1e3:.1f}" for v in t) + " |")
    rows.append(f"| all {cfg.n_layers * 7} matrices (s) | | " +
                " | ".join(f"{v:.2f}" for v in totals) + " |")
    return "\n".join(rows) + (f"\n\n{b} tokens, rank {args.rank}, best of 3; per step at gap "
                              f"{args.gap}: divide by {args.gap}.\n")


# ---- main -------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="60m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--gap", type=int, default=200)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds after the warm-up step")
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--refresh-cost", action="store_true")
    p.add_argument("--quick", action="store_true", help="micro config, 3 rounds")
    p.add_argument("--note", default="", help="a line for the results file (e.g. machine load)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.config, args.vocab, args.seq, args.rank, args.rounds = "micro", 256, 64, 16, 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        return mem_child(args, device)
    out = args.out or str(HERE / "results" / ("lowrank_backward_quick.md" if args.quick
                                               else "lowrank_backward.md"))
    sections = []
    if not args.skip_time:
        sections.append(("Training step time (forward + backward + optimizer)", part_time(args, device)))
    if not args.skip_memory:
        sections.append(("Peak memory", part_memory(args, device)))
    if not args.skip_ddp:
        sections.append(("DDP: bytes all-reduced per step", part_ddp(args)))
    if args.refresh_cost:
        sections.append(("Refresh: dense gradient vs sketch from activations",
                         part_refresh_cost(args)))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    header = (f"# GaLore with a low-rank backward (issue #20)\n\n"
              f"`{' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}`\n\n"
              f"torch {torch.__version__}, {device} ({platform.processor() or platform.machine()}), "
              f"{args.threads} thread(s), git {rev}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
              f"LlamaLM {args.config}, vocabulary {args.vocab}, batch {args.batch}x{args.seq} "
              f"tokens, rank {args.rank}, gap {args.gap}.{(' ' + args.note) if args.note else ''}\n")
    text = header + "".join(f"\n## {t}\n\n{body}" for t, body in sections)
    print(text)
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
