"""Optimizer step time and optimizer-state bytes, side by side, on the blocks of
``common.LlamaLM`` with fixed random gradients (docs/benchmarks.md).

    python benchmarks/bench_step.py --threads 1            # LLaMA-60M shapes, rank 128, 2 windows of 200 steps
    python benchmarks/bench_step.py --quick                # smoke test, about a minute
    python benchmarks/bench_step.py --optimizers adamw_fused,galore,qgalore --device cuda
"""
import copy, gc, os, statistics, time

import torch
from torch import nn

import common as C
import lowrank_optim as lo

DEFAULT = ("adamw+foreach=True,adamw_fused,adamw8bit,floor,galore,galore_nostagger,"
           "galore_randomized,galore_randomized+stagger=False,galore8bit,qgalore,galore_torch")
QUICK = dict(n_layers=1, update_proj_gap=8, repeats=1, warmup=2, pool=2,
             out="benchmarks/results/step_quick.md")


class ProjectionFloor(torch.optim.Optimizer):
    """The ``floor`` row: only the two GEMMs GaLore cannot avoid, on a fixed orthonormal
    basis of the ``std`` side; plain parameters get ``p -= lr g``."""

    def __init__(self, model, a):
        projected = {n for n, _, pr in C.matrix_shapes(model) if pr}
        super().__init__(list(model.parameters()), dict(lr=a.lr))
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name in projected:
                k = min(p.shape)
                b = torch.linalg.qr(torch.randn(k, min(a.rank, k), generator=gen))[0]
                self.state[p]["basis"] = b.to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                b, g, lr = self.state[p].get("basis"), p.grad, -group["lr"]
                if b is None:
                    p.add_(g, alpha=lr)
                elif p.shape[0] >= p.shape[1]:
                    p.addmm_(g @ b, b.T, alpha=lr)       # R = G Q, then R Qᵀ
                else:
                    p.addmm_(b, b.T @ g, alpha=lr)       # R = Pᵀ G, then P R


def build(spec: str, model: nn.Module, a) -> dict:
    """The row of one ``--optimizers`` entry: its optimizer (on the model, which may be
    swapped: Q-GaLore's INT8 weights), label, closed-form class and refresh counter."""
    if spec == "floor":
        opt, label, cls = ProjectionFloor(model, a), "floor (projection GEMMs only)", None
    elif spec == "galore_torch":  # pip install --no-deps galore-torch==1.0 (needs transformers)
        import galore_torch
        opt = galore_torch.GaLoreAdamW(lo.param_groups(
            model, rank=a.rank, update_proj_gap=a.update_proj_gap, scale=a.scale,
            proj_type="std"), lr=a.lr)
        label, cls = "galore_torch (GaLoreAdamW 1.0)", "GaLoreAdamW"
    else:
        model, opt, _ = C.method(spec).build(model, C.MethodArgs(
            lr=a.lr, rank=a.rank, update_proj_gap=a.update_proj_gap, scale=a.scale))
        label, cls = spec, type(opt).__name__

    def count():  # basis refreshes so far (galore-torch: at steps 0, T, 2T, ... of a matrix)
        if spec != "galore_torch":
            return sum(int(st.get("refresh_count", 0)) for st in opt.state.values())
        return sum(0 if (s := opt.state[p].get("step", 0)) == 0 else
                   1 + (s - 1) // g["update_proj_gap"]
                   for g in opt.param_groups if "rank" in g for p in g["params"])
    return dict(label=label, opt=opt, cls=cls, params=list(model.parameters()), count=count,
                times=[], cpu=[], refreshed=[], warm=[])


def bench(a, dev):
    """Warm-up steps, then windows of steps interleaved across the optimizers."""
    cfg = C.ModelConfig(a.hidden, a.n_layers, a.n_heads, a.intermediate)
    torch.manual_seed(a.seed)
    master = nn.ModuleDict(dict(layers=nn.ModuleList(C.Block(cfg) for _ in range(a.n_layers))))
    shapes = C.matrix_shapes(master.to(dev))
    gen = torch.Generator().manual_seed(a.seed)
    grads = [[torch.randn(s, generator=gen).to(dev) for _, s, _ in shapes] for _ in range(a.pool)]
    rows = []
    for spec in a.optimizers.split(","):
        try:
            rows.append(build(spec.strip(), copy.deepcopy(master), a))
        except Exception as exc:  # noqa: BLE001 - reported in the log, the row left out
            print(f"  skip {spec}: {exc!r}")
    if not rows:
        raise SystemExit("no optimizer could be built")

    def one_step(r, k):  # (wall s, CPU s, whether a basis was refreshed)
        for p, g in zip(r["params"], grads[k % a.pool]):
            p.grad = g
        c0 = r["count"]()
        C.sync(dev)
        cpu, t0 = time.process_time(), time.perf_counter()
        r["opt"].step()
        C.sync(dev)
        return time.perf_counter() - t0, time.process_time() - cpu, r["count"]() > c0

    for s in range(a.warmup):
        for r in rows:
            r["warm"].append(one_step(r, s)[0])
    gc.collect()
    gc.disable()
    for rep in range(a.repeats):
        t0 = time.perf_counter()
        for s in range(a.steps):
            for r in rows[s % len(rows):] + rows[:s % len(rows)]:
                for key, x in zip(("times", "cpu", "refreshed"),
                                  one_step(r, a.warmup + rep * a.steps + s)):
                    r[key].append(x)
        gc.collect()
        print(f"  window {rep + 1}/{a.repeats}: {a.steps} steps x {len(rows)} optimizers "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
    gc.enable()
    return rows, shapes


def tables(rows, shapes, a):
    """The step-time and the state tables (columns: docs/benchmarks.md)."""
    ms = lambda x: "" if x is None else f"{1e3 * x:.1f}"  # noqa: E731
    mean = lambda r: sum(r["times"]) / len(r["times"])  # noqa: E731
    ratio = lambda r, key: next((f"{mean(r) / mean(o):.2f}" for o in rows  # noqa: E731
                                 if o["label"].startswith(key)), "n/a")
    ref, time_rows, state_rows = rows[0], [], []
    for r in rows:
        t, n = r["times"], a.steps
        steady = statistics.median([x for x, f in zip(t, r["refreshed"]) if not f] or t)
        svd = [x for x, f in zip(t, r["refreshed"]) if f]
        windows = [sum(t[i:i + n]) / n for i in range(0, len(t), n)]
        time_rows.append([
            r["label"], ms(mean(r)),
            "–".join(ms(f(windows)) for f in (min, max)) if len(windows) > 1 else "",
            ms(sum(r["cpu"]) / len(t)), ms(steady), ms(statistics.median(svd) if svd else None),
            ms(max(t)), f"{max(t) / steady:.2f}", sum(r["refreshed"]),
            f"{1e3 * r['warm'][0]:.0f}" if r["warm"] else "", ratio(r, ref["label"]),
            ratio(r, "adamw_fused"), ratio(r, "galore_torch")])
        state, held = C.state_bytes(r["opt"]), C.state_bytes(r["opt"], held=True)
        closed = C.closed_form(r["cls"], shapes, a.rank, 4)[1] if r["cls"] in C.CLOSED_FORM \
            else None
        state_rows.append([
            r["label"], f"{state:,}", f"{state / 2 ** 20:.2f}",
            "n/a" if closed is None else f"{closed:,}",
            "n/a" if closed is None else "yes" if closed == state else f"no ({state - closed:+,})",
            f"{state / C.state_bytes(ref['opt']):.3f}", f"{held:,}", f"{held / 2 ** 20:.2f}",
            f"{held / state:.2f}" if state else ""])
    return (C.md_table(["optimizer", "amortized ms/step", "window means ms", "amortized CPU ms",
                        "steady median ms", "SVD-step median ms", "max step ms", "max / steady",
                        "steps with SVD", "first step ms", f"× {ref['label']}",
                        "× adamw_fused", "× galore-torch"], time_rows),
            C.md_table(["optimizer", "state bytes (measured)", "MiB", "closed form bytes",
                        "agree", f"× {ref['label']}", "storage bytes held",
                        "storage MiB", "storage / state"], state_rows))


def main(argv=None):
    ap = C.parser(__doc__, quick=False, hidden=512, intermediate=1376, n_layers=8, n_heads=8,
                  rank=128, update_proj_gap=200, steps=0, repeats=2, warmup=3, pool=4, seed=0,
                  threads=0, scale=0.25, lr=1e-3,
                  device="cuda" if torch.cuda.is_available() else "cpu", optimizers=DEFAULT,
                  out="benchmarks/results/step.md")
    if ap.parse_args(argv).quick:
        ap.set_defaults(**QUICK)
    a = ap.parse_args(argv)
    a.steps = a.steps or a.update_proj_gap  # default: one refresh gap per window
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, t0, load = torch.device(a.device), time.perf_counter(), os.getloadavg()[0]
    rows, shapes = bench(a, dev)
    t_table, s_table = tables(rows, shapes, a)
    load = max(load, os.getloadavg()[0])
    meta = C.report_meta("bench_step.py", argv, f"{C.device_name(dev)}; load average up to "
                         f"{load:.2f}" + (" (**busy machine: timings are noisy**)"
                                          if load > 0.75 * os.cpu_count() else ""),
                         **{"total time": f"{time.perf_counter() - t0:.0f} s"})
    body = (f"## Optimizer step time\n\n{len(shapes)} tensors, "
            f"{sum(p.numel() for p in rows[0]['params']) / 1e6:.2f}M parameters "
            f"({sum(pr for *_, pr in shapes)} projected matrices), rank {a.rank}, update_proj_gap "
            f"{a.update_proj_gap}, scale {a.scale}; {a.warmup} warm-up steps, then {a.repeats} "
            f"window(s) of {a.steps} steps; a pool of {a.pool} gradient sets. Columns: "
            "docs/benchmarks.md, bench_step.py.\n\n"
            + "".join(f"- `{r['label']}`: {C.method(r['label']).description}\n" for r in rows
                      if r["label"].split("+")[0] in C.METHODS)
            + f"\n{t_table}\n\n## Optimizer state\n\n{s_table}\n")
    print(C.write_report(a.out, "bench_step: optimizer step time and state", meta, body))


if __name__ == "__main__":
    main()
