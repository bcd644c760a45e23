"""Exact vs randomized SVD for GaLore's projector basis: time, captured gradient energy and
subspace overlap, at LLaMA-1B shapes or on real gradients (docs/benchmarks.md).

    python benchmarks/bench_svd.py --quick      # smoke test: small shapes, seconds
    python benchmarks/bench_svd.py              # 2048x2048 and 2048x5461, ranks 128, 512
    python benchmarks/bench_svd.py --real llama_60m --ranks 128 --threads 1
"""
import os, statistics, time

import common as C

import torch

import lowrank_optim as lo
from lowrank_optim.projector import LEFT, choose_side, compute_basis


def gradient_like(m: int, n: int, a, dev: torch.device) -> torch.Tensor:
    """U diag(s) V^T + E: s_k = k^-decay, random orthonormal U, V, relative noise."""
    gen = torch.Generator().manual_seed(a.seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen).to(dev))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen).to(dev))[0]
    g = (u * torch.arange(1, k + 1, dtype=torch.float32, device=dev) ** -a.decay) @ v.T
    e = torch.randn(m, n, generator=gen).to(dev)
    return g + e * (a.noise * g.norm() / e.norm())


def basis(g: torch.Tensor, rank: int, dev, **kw) -> tuple[float, torch.Tensor]:
    """(seconds, the basis of the side ``proj_type="std"`` keeps) of one compute_basis."""
    with C.Timer(dev) as t:
        u, v = compute_basis(g, rank, **kw)
    return t.total, u if choose_side(g.shape, "std") == LEFT else v


def energy(g: torch.Tensor, p: torch.Tensor) -> float:
    """||P^T G||^2 / ||G||^2 (or ||G Q||^2 / ||G||^2 for a right basis)."""
    low = p.T @ g if choose_side(g.shape, "std") == LEFT else g @ p
    return float(low.double().square().sum() / g.double().square().sum())


def real_rows(a, dev: torch.device) -> tuple[str, str]:
    """Gradients of a LlamaLM trained with GaLoreAdamW, now and later; the energy of each
    basis of the *now* gradients, on them and on the *later* ones."""
    torch.manual_seed(a.seed)
    cfg, rank, corpus = C.get_config(a.real), a.ranks[0], C.load_corpus()
    model = C.LlamaLM(cfg).to(dev)
    batches = C.Batches(corpus, a.batch_size, a.seq_len or cfg.seq_len, a.seed, 1, dev)
    groups = lo.param_groups(model, rank=rank, target_modules=("attn", "mlp"))
    opt = lo.GaLoreAdamW(groups, lr=1e-2)
    mats = [p for g in groups if g.get("rank") for p in g["params"]]
    kept = []
    for step in range(a.real_steps + a.lag + 1):
        x, y = batches.next_train()
        model(x, y).backward()
        if step in (a.real_steps, a.real_steps + a.lag):
            kept.append([p.grad.detach().clone() for p in mats])
        opt.step()
        opt.zero_grad(set_to_none=True)
    now, later = kept
    methods = [("exact", dict(svd="exact"))] + [
        (f"randomized, niter {k}", dict(svd="randomized", oversample=a.oversample, niter=int(k)))
        for k in a.niters.split(",")]
    for _, kw in methods:  # warm-up: first calls pay for library initialisation
        compute_basis(now[0], rank, **kw)
    rows = []
    for name, kw in methods:
        timed = [basis(g, rank, dev, **kw) for g in now]
        e_now = sum(energy(g, p) for g, (_, p) in zip(now, timed)) / len(now)
        e_later = sum(energy(g, p) for g, (_, p) in zip(later, timed)) / len(now)
        rows.append((name, e_now, e_later, sum(t for t, _ in timed)))
    ex_now, ex_later = rows[0][1], rows[0][2]
    table = C.md_table(["basis", "energy now", "now / exact", "energy later", "later / exact",
                        "time s"], [[n, f"{en:.5f}", f"{en / ex_now:.5f}", f"{el:.5f}",
                                     f"{el / ex_later:.5f}", f"{t:.2f}"] for n, en, el, t in rows])
    return "exact vs randomized SVD on real gradients", (
        f"`{a.real}` LlamaLM (byte vocabulary), {len(mats)} attention/MLP matrices, trained "
        f"with GaLoreAdamW (rank {rank}, lr 1e-2) on {corpus.describe()}, {a.batch_size}×"
        f"{batches.t} tokens per step; gradients at step {a.real_steps} (*now*) and "
        f"{a.real_steps + a.lag} (*later*); randomized sketches of rank + {a.oversample} "
        "columns. Columns: docs/benchmarks.md, bench_svd.py.\n\n" + table)


def synthetic_rows(a, dev: torch.device) -> tuple[str, str]:
    """Median times, energies and overlap of the two bases per (shape, rank)."""
    rows = []
    for m, n in (tuple(map(int, s.lower().split("x"))) for s in a.shapes.split(",")):
        g = gradient_like(m, n, a, dev)
        for r in a.ranks:
            kws = {"exact": dict(svd="exact"),
                   "randomized": dict(svd="randomized", oversample=a.oversample, niter=a.niter)}
            for _ in range(a.warmup):
                for kw in kws.values():
                    basis(g, r, dev, **kw)
            times, bases = {k: [] for k in kws}, {}
            for rep in range(a.repeats):  # alternating, so that noise hits both alike
                for name in list(kws)[::1 if rep % 2 == 0 else -1]:
                    t, bases[name] = basis(g, r, dev, **kws[name])
                    times[name].append(t)
            t_ex, t_rd = (statistics.median(times[k]) for k in kws)
            e_ex, e_rd = (energy(g, bases[k]) for k in kws)
            ov = float((bases["exact"].T @ bases["randomized"]).double().square().sum()) \
                / bases["exact"].shape[1]
            rows.append([f"{m}×{n}", r, "left" if choose_side((m, n), "std") == LEFT else
                         "right", f"{t_ex:.3f}", f"{t_rd:.3f}", f"{t_ex / t_rd:.2f}",
                         f"{e_ex:.5f}", f"{e_rd:.5f}", f"{e_rd / e_ex:.5f}", f"{ov:.4f}"])
    table = C.md_table(["shape (m×n)", "rank", "basis side", "exact s", "randomized s",
                        "exact / randomized time", "energy exact (optimum)",
                        "energy randomized", "randomized / exact energy", "subspace overlap"],
                       rows)
    return "exact vs randomized SVD for the projector basis", (
        f"Gradient-like float32 matrices G = U diag(s) Vᵀ + E, s_k = k^-{a.decay:g}, "
        f"‖E‖_F = {a.noise:g}·‖U diag(s) Vᵀ‖_F, seed {a.seed}; median of {a.repeats} calls "
        f"after {a.warmup} warm-up call(s); randomized: q = rank + {a.oversample} columns, "
        f"niter = {a.niter}. Columns: docs/benchmarks.md, bench_svd.py.\n\n" + table)


def main(argv=None) -> None:
    a = C.parser(  # "": the default of the mode (docs/benchmarks.md)
        __doc__, quick=False, shapes="", ranks="", repeats=3, warmup=1, oversample=8, niter=1,
        decay=1.0, noise=0.05, seed=0, threads=0, real="", real_steps=100, lag=20,
        niters="0,1,2", batch_size=4, seq_len=0,
        device="cuda" if torch.cuda.is_available() else "cpu", out="").parse_args(argv)
    a.shapes = a.shapes or ("256x256,256x683" if a.quick else "2048x2048,2048x5461")
    a.ranks = [int(r) for r in (a.ranks or ("16,64" if a.quick else "128,512")).split(",")]
    a.out = a.out or os.path.join(C.ROOT, "benchmarks", "results", "svd_real.md" if a.real
                                  else "svd_quick.md" if a.quick else "svd.md")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, started, load = torch.device(a.device), time.perf_counter(), os.getloadavg()[0]
    title, body = (real_rows if a.real else synthetic_rows)(a, dev)
    print(C.write_report(a.out, f"bench_svd: {title}", C.report_meta(
        "bench_svd.py", argv, f"{C.device_name(dev)}; load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end",
        **{"total time": f"{time.perf_counter() - started:.0f} s"}), body))


if __name__ == "__main__":
    main()
