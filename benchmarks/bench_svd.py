"""Exact vs randomized SVD for the projector basis, at LLaMA-1B matrix shapes.

GaLore recomputes every projected matrix's basis from its gradient once per
``update_proj_gap`` steps; at 1B scale that SVD is the most expensive thing the optimizer
does. This script times ``lowrank_optim.projector.compute_basis`` with
``svd="exact"`` (``torch.linalg.svd``, O(m n min(m, n))) and ``svd="randomized"``
(the package's range finder: a Gaussian sketch of ``rank + oversample`` columns and
``niter`` power iterations, O(m n r)) on the shapes of LLaMA-1B (hidden 2048, intermediate 5461:
attention 2048x2048, MLP 2048x5461) for ranks 128 and 512.

Test matrices are gradient-like and seeded: G = U diag(s) V^T + E with U, V random
orthonormal (QR of Gaussian matrices), s_k = k^-decay for k = 1..min(m, n) (decay 1 by
default), and Gaussian noise E scaled so that ||E||_F = noise * ||U diag(s) V^T||_F.

Reported per (shape, rank): the median wall time of ``--repeats`` calls of each method
(after ``--warmup`` untimed calls; exact and randomized calls alternate so that a noisy
stretch on a shared machine hits both), the time ratio exact / randomized, and the
fraction of gradient energy the basis captures, ||P^T G||_F^2 / ||G||_F^2 for the side
GaLore's ``proj_type="std"`` keeps (left basis U_r when m < n, else right basis V_r, with
||G V_r||_F^2). The exact SVD's fraction is the optimum over all rank-r bases
(Eckart-Young); the randomized fraction is at most that. Also reported: the subspace
overlap ||P_exact^T P_rand||_F^2 / r of the two bases (1 = same subspace).

Results are printed as Markdown and written, with torch version, device, thread count,
date and the exact command line, to ``--out`` (default ``benchmarks/results/svd.md``;
``--quick`` writes ``benchmarks/results/svd_quick.md`` unless ``--out`` is given).

Command lines (from the repository root):

    python benchmarks/bench_svd.py --quick      # smoke test: small shapes, seconds
    python benchmarks/bench_svd.py              # full: 2048x2048 and 2048x5461, ranks 128, 512
    python benchmarks/bench_svd.py --ranks 64,128,256,512 --repeats 5
    python benchmarks/bench_svd.py --niter 0 --oversample 16   # cheaper randomized SVD
    python benchmarks/bench_svd.py --device cuda               # the same on a GPU
    python benchmarks/bench_svd.py --real llama_60m            # real gradients (below)

``--real CONFIG`` measures on real gradients instead: a ``LlamaLM`` of that config (byte
vocabulary) is trained with ``GaLoreAdamW`` on the stdlib corpus for ``--real-steps``
steps; the gradients of its projected (attention and MLP) matrices are kept at that step
and ``--lag`` steps later. For the exact SVD and the randomized SVD with each of
``--niters`` power iterations, reported are the mean over the matrices of the energy the
basis of the first gradient captures of that gradient (*now*) and of the later one
(*later*: what GaLore uses a basis for, until its next refresh), each also relative to
the exact SVD's, and the total time of the bases. Written to ``--out`` (default
``benchmarks/results/svd_real.md``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

# -------------------------------------------------------------------------------------
# defaults (LLaMA-1B: hidden 2048, intermediate 5461)
shapes = "2048x2048,2048x5461"
ranks = "128,512"
quick_shapes = "256x256,256x683"   # the same aspect ratios, 8x smaller
quick_ranks = "16,64"
repeats = 3             # timed calls per method; the median is reported
warmup = 1              # untimed calls per method before timing
oversample = 8          # randomized SVD: rank + oversample columns (the projector's default)
niter = 1               # randomized SVD: power iterations (the projector's default)
decay = 1.0             # singular values s_k = k ** -decay
noise = 0.05            # ||noise||_F / ||low-rank part||_F
seed = 0
threads = None          # torch intra-op threads; None = torch's default
device = "auto"         # "auto": cuda when available, else cpu
out = None              # None: benchmarks/results/svd.md (svd_quick.md with --quick)
real = None             # --real CONFIG: real gradients of that LlamaLM config instead
real_steps = 100        # --real: GaLoreAdamW steps before the first gradient is kept
lag = 20                # --real: steps between the two gradients kept
niters = "0,1,2"        # --real: power iterations of the randomized SVDs compared
# -------------------------------------------------------------------------------------

from _paths import HERE

import torch

import common as C

from lowrank_optim.projector import LEFT, choose_side, compute_basis


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated MxN shapes (default {shapes}; --quick: {quick_shapes})")
    p.add_argument("--ranks", default=None,
                   help=f"comma-separated ranks (default {ranks}; --quick: {quick_ranks})")
    p.add_argument("--quick", action="store_true", help="small shapes and ranks, for smoke tests")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--oversample", type=int, default=oversample)
    p.add_argument("--niter", type=int, default=niter)
    p.add_argument("--decay", type=float, default=decay)
    p.add_argument("--noise", type=float, default=noise)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--device", default=device)
    p.add_argument("--out", default=out)
    p.add_argument("--real", default=real, metavar="CONFIG",
                   help="real gradients of a LlamaLM config (e.g. llama_60m), see above")
    p.add_argument("--real-steps", type=int, default=real_steps)
    p.add_argument("--lag", type=int, default=lag)
    p.add_argument("--niters", default=niters, help="--real: comma list of power iterations")
    p.add_argument("--batch-size", type=int, default=4, help="--real: sequences per step")
    p.add_argument("--seq-len", type=int, default=None,
                   help="--real: tokens per sequence (default: the config's)")
    a = p.parse_args(argv)
    a.shapes = a.shapes or (quick_shapes if a.quick else shapes)
    a.ranks = a.ranks or (quick_ranks if a.quick else ranks)
    a.out = a.out or os.path.join(HERE, "results", "svd_real.md" if a.real else
                                  "svd_quick.md" if a.quick else "svd.md")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return a


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m, n = item.lower().split("x")
        out.append((int(m), int(n)))
    return out


def gradient_like(m: int, n: int, decay_: float, noise_: float, seed_: int,
                  dev: torch.device) -> torch.Tensor:
    """U diag(s) V^T + E: s_k = k^-decay, random orthonormal U, V, relative noise."""
    gen = torch.Generator().manual_seed(seed_)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen).to(dev))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen).to(dev))[0]
    s = torch.arange(1, k + 1, dtype=torch.float32, device=dev) ** -decay_
    g = (u * s) @ v.T
    e = torch.randn(m, n, generator=gen).to(dev)
    return g + e * (noise_ * g.norm() / e.norm())


def timed(fn, dev: torch.device):
    C.sync(dev)
    t0 = time.perf_counter()
    res = fn()
    C.sync(dev)
    return time.perf_counter() - t0, res


def energy(g: torch.Tensor, basis: torch.Tensor, side: int) -> float:
    low = basis.T @ g if side == LEFT else g @ basis
    return float(low.double().square().sum() / g.double().square().sum())


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def real_gradients(a, dev: torch.device, rank: int) -> tuple[list, list, str]:
    """The projected matrices' gradients at step ``a.real_steps`` and ``a.lag`` steps later
    of a LlamaLM trained with GaLoreAdamW at ``rank``."""
    import lowrank_optim as lo

    torch.manual_seed(a.seed)
    cfg = C.get_config(a.real)
    model = C.LlamaLM(cfg).to(dev)
    corpus = C.load_corpus()
    seq_len = a.seq_len or cfg.seq_len
    batches = C.Batches(corpus, a.batch_size, seq_len, a.seed, 1, dev)
    groups = lo.param_groups(model, rank=rank, target_modules=("attn", "mlp"))
    opt = lo.GaLoreAdamW(groups, lr=1e-2)
    mats = [p for g in groups if g.get("rank") for p in g["params"]]
    kept = {}
    for step in range(a.real_steps + a.lag + 1):
        x, y = batches.next_train()
        model(x, y).backward()
        if step in (a.real_steps, a.real_steps + a.lag):
            kept[step] = [p.grad.detach().clone() for p in mats]
        opt.step()
        opt.zero_grad(set_to_none=True)
    what = (f"`{a.real}` LlamaLM (byte vocabulary), {len(mats)} attention/MLP matrices, "
            f"trained with GaLoreAdamW (rank {rank}, lr 1e-2) on {corpus.describe()}, "
            f"{a.batch_size}×{seq_len} tokens per step; gradients at step {a.real_steps} "
            f"(*now*) and {a.real_steps + a.lag} (*later*)")
    return kept[a.real_steps], kept[a.real_steps + a.lag], what


def real_main(a, dev: torch.device, load_start: str, started: float) -> str:
    rank = int(a.ranks.split(",")[0])  # the first of --ranks
    now, later, what = real_gradients(a, dev, rank)
    methods = [("exact", dict(svd="exact"))] + [
        (f"randomized, niter {k}", dict(svd="randomized", oversample=a.oversample, niter=int(k)))
        for k in a.niters.split(",")]
    for _, kw in methods:  # warm-up: first calls pay for library initialisation
        compute_basis(now[0], rank, **kw)
    rows = []
    for name, kw in methods:
        e_now = e_later = secs = 0.0
        for g, g2 in zip(now, later):
            side = choose_side(g.shape, "std")
            t, (u, v) = timed(lambda: compute_basis(g, rank, **kw), dev)
            basis = u if side == LEFT else v
            e_now += energy(g, basis, side) / len(now)
            e_later += energy(g2, basis, side) / len(now)
            secs += t
        rows.append((name, e_now, e_later, secs))
        print(f"{name}: energy now {e_now:.5f}, later {e_later:.5f}, {secs:.2f} s", flush=True)
    ex_now, ex_later = rows[0][1], rows[0][2]
    table = C.md_table(["basis", "energy now", "now / exact", "energy later", "later / exact",
                        "time s"], [[n, f"{en:.5f}", f"{en / ex_now:.5f}", f"{el:.5f}",
                                     f"{el / ex_later:.5f}", f"{t:.2f}"] for n, en, el, t in rows])
    return write("exact vs randomized SVD on real gradients", f"{what}. Energy: ‖PᵀG‖²/‖G‖² (or ‖GQ‖²/‖G‖²) of the basis of the *now* gradient, "
        "for the side GaLore's `proj_type=\"std\"` keeps, mean over the matrices; rank "
        f"{rank}, randomized sketches of rank + {a.oversample} columns. Time: all the "
        "matrices' bases, one call each.\n\n" + table, a, dev, load_start, started)


def write(title: str, body: str, a, dev, load_start: str, started: float) -> str:
    """The results file: command, date, versions, device and time, then ``body``."""
    doc = C.write_report(a.out, f"bench_svd: {title}", {
        "command": f"`{C.command_line('bench_svd.py', a.argv)}`",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": C.versions(),
        "device": f"{C.device_name(dev)}; load average {load_start} at start, "
                  f"{load_average()} at end",
        "total time": f"{time.perf_counter() - started:.0f} s"}, body)
    print(doc)
    print(f"written to {a.out}")
    return doc


def main(argv=None) -> str:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    shape_list = parse_shapes(a.shapes)
    rank_list = [int(r) for r in a.ranks.split(",")]
    started = time.perf_counter()
    load_start = load_average()
    a.argv = sys.argv[1:] if argv is None else list(argv)
    if a.real:
        return real_main(a, dev, load_start, started)

    rows = []
    for (m, n) in shape_list:
        g = gradient_like(m, n, a.decay, a.noise, a.seed, dev)
        side = choose_side((m, n), "std")
        for r in rank_list:
            calls = {
                "exact": lambda: compute_basis(g, r, "exact"),
                "randomized": lambda: compute_basis(g, r, "randomized",
                                                    oversample=a.oversample, niter=a.niter),
            }
            for _ in range(a.warmup):
                for fn in calls.values():
                    timed(fn, dev)
            times = {k: [] for k in calls}
            bases = {}
            for rep in range(a.repeats):
                order = list(calls) if rep % 2 == 0 else list(calls)[::-1]
                for name in order:
                    t, (u, v) = timed(calls[name], dev)
                    times[name].append(t)
                    bases[name] = u if side == LEFT else v
            med = {k: statistics.median(v) for k, v in times.items()}
            e_ex = energy(g, bases["exact"], side)
            e_rd = energy(g, bases["randomized"], side)
            rr = bases["exact"].shape[1]
            ov = float((bases["exact"].T @ bases["randomized"]).double().square().sum()) / rr
            row = dict(shape=f"{m}×{n}", rank=r, side="left" if side == LEFT else "right",
                       t_ex=med["exact"], t_rd=med["randomized"], e_ex=e_ex, e_rd=e_rd, ov=ov)
            rows.append(row)
            print(f"{m}x{n} rank {r}: exact {med['exact']:.3f} s, randomized "
                  f"{med['randomized']:.3f} s, energy {e_ex:.5f} / {e_rd:.5f}", flush=True)
        del g

    table = C.md_table(
        ["shape (m×n)", "rank", "basis side", "exact s", "randomized s",
         "exact / randomized time", "energy exact (optimum)", "energy randomized",
         "randomized / exact energy", "subspace overlap"],
        [[w["shape"], w["rank"], w["side"], f"{w['t_ex']:.3f}", f"{w['t_rd']:.3f}",
          f"{w['t_ex'] / w['t_rd']:.2f}", f"{w['e_ex']:.5f}", f"{w['e_rd']:.5f}",
          f"{w['e_rd'] / w['e_ex']:.5f}", f"{w['ov']:.4f}"] for w in rows])
    return write("exact vs randomized SVD for the projector basis", f"Gradient-like float32 matrices G = U diag(s) Vᵀ + E, s_k = k^-{a.decay:g} "
        f"(k = 1..min(m, n)), ‖E‖_F = {a.noise:g}·‖U diag(s) Vᵀ‖_F, seed {a.seed}. "
        "Time: median of "
        f"{a.repeats} calls of `lowrank_optim.projector.compute_basis` after {a.warmup} "
        "warm-up call(s), exact and randomized alternating. Exact: `torch.linalg.svd` "
        "(full_matrices=False). Randomized: the package's range finder with q = rank + "
        f"{a.oversample} columns and niter = {a.niter}. Energy: ‖PᵀG‖²/‖G‖² for the basis "
        "side GaLore's `proj_type=\"std\"` keeps (left when m < n, else right); the exact "
        "value is the optimum for that rank. Subspace overlap: ‖P_exactᵀ P_rand‖²_F / r.\n\n"
        + table, a, dev, load_start, started)


if __name__ == "__main__":
    main()
