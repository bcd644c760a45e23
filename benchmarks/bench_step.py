"""Optimizer step time and optimizer-state bytes, side by side.

The model is the blocks of ``common.LlamaLM`` (default LLaMA-60M: hidden 512, intermediate
1376, 8 layers; attention q, k, v, o and MLP gate, up, down matrices plus the two RMSNorm
weights per block; ``--embed`` trains the whole LlamaLM, with its vocab x hidden embedding
and head, both plain). Every optimizer of ``--optimizers`` gets its own copy of it and
steps on the same fixed random gradients, set as ``p.grad`` from a pre-generated pool (no
backward is timed). Optimizers are ``common.METHODS`` entries (``NAME+key=value`` adds
optimizer keywords), plus two rows of this script:

* ``floor``: not an optimizer, only the two GEMMs that GaLore cannot avoid, on a fixed
  orthonormal basis of the ``std`` side (``R = G Q`` or ``P^T G``, then ``p.addmm_`` of the
  back projection); plain parameters get ``p -= lr g``;
* ``galore_torch``: galore-torch 1.0's ``GaLoreAdamW`` when it is installed (``pip install
  --no-deps galore-torch==1.0``; its import of ``transformers`` for a version check is
  stubbed when transformers is absent).

Each optimizer is warmed up (``--warmup`` steps, the first of which computes every basis),
then timed over ``--repeats`` windows of ``--steps`` steps (default: one refresh gap, so
every matrix is refreshed once per window, with and without stagger: the amortized time
includes the SVDs). Steps are interleaved: at each step index every optimizer takes one
step, in an order rotated from step to step, so that a noisy stretch on a shared machine
hits all of them alike. Reported per optimizer: mean step time over the windows
(amortized), the median of the steps that refreshed no basis (steady), the median of those
that did, the slowest step and its ratio to the steady one, the first step, and ratios to
the first optimizer (torch AdamW, foreach), to ``adamw_fused`` and to galore-torch. State:
``common.state_bytes`` (every tensor once; held: whole storages) next to
``common.closed_form``.

    python benchmarks/bench_step.py --threads 1            # LLaMA-60M shapes, rank 128, 2 windows of 200 steps
    python benchmarks/bench_step.py --quick                # smoke test, about a minute
    python benchmarks/bench_step.py --optimizers adamw_fused,galore,qgalore --device cuda
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import statistics
import sys
import time
import types
import warnings

import torch
from torch import nn

import common as C
import lowrank_optim as lo

DEFAULT = ("adamw+foreach=True,adamw_fused,adamw8bit,floor,galore,galore_nostagger,"
           "galore_randomized,galore_randomized+stagger=False,galore8bit,qgalore,galore_torch")
QUICK = dict(n_layers=1, update_proj_gap=8, repeats=1, warmup=2, pool=2)


class ProjectionFloor(torch.optim.Optimizer):
    """The reference row ``floor`` (see the module docstring)."""

    def __init__(self, model, a):
        projected = {n for n, _, pr in C.matrix_shapes(model) if pr}
        super().__init__(list(model.parameters()), dict(lr=a.lr))
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name in projected:
                m, n = p.shape
                b = torch.linalg.qr(torch.randn(n if m >= n else m, min(a.rank, m, n),
                                                generator=gen))[0]
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


def import_galore_torch():
    """(module, version) of galore-torch, or (None, why not)."""
    try:
        from importlib.metadata import version
        ver = version("galore-torch")
    except Exception:  # noqa: BLE001
        return None, "not installed (pip install --no-deps galore-torch==1.0)"
    stubbed = []
    try:
        importlib.import_module("transformers.utils.versions")
    except ImportError:  # galore-torch 1.0 imports transformers for require_version only
        for name in ("transformers", "transformers.utils", "transformers.utils.versions"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = []
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


def build(spec: str, model: nn.Module, a, gt):
    """(model, optimizer, label, closed-form class name or None) of one ``--optimizers``
    entry; the model may be swapped (Q-GaLore's INT8 weights)."""
    if spec == "floor":
        return model, ProjectionFloor(model, a), "floor (projection GEMMs only)", None
    if spec == "galore_torch":
        if gt is None:
            raise RuntimeError("galore-torch is not installed")
        groups = lo.param_groups(model, rank=a.rank, update_proj_gap=a.update_proj_gap,
                                 scale=a.scale, proj_type="std")
        return model, gt.GaLoreAdamW(groups, lr=a.lr), "galore_torch (GaLoreAdamW 1.0)", "GaLoreAdamW"
    m = C.method(spec)
    prep = m.build(model, C.MethodArgs(lr=a.lr, rank=a.rank, update_proj_gap=a.update_proj_gap,
                                       scale=a.scale))
    return prep.model, prep.optimizer, spec, type(prep.optimizer).__name__


def refresh_counter(opt, gt_row: bool):
    """Cumulative number of basis refreshes (to tell steady steps from SVD steps)."""
    if not gt_row:
        return lambda: sum(int(st.get("refresh_count", 0)) for st in opt.state.values()
                           if isinstance(st, dict))

    def count():  # galore-torch refreshes at steps 0, T, 2T, ... of each matrix
        return sum(0 if (s := opt.state[p].get("step", 0)) == 0 else 1 + (s - 1) // g["update_proj_gap"]
                   for g in opt.param_groups if "rank" in g for p in g["params"])
    return count


def make_model(a, dev):
    cfg = C.ModelConfig(a.hidden, a.n_layers, a.n_heads, a.intermediate, vocab_size=a.vocab)
    torch.manual_seed(a.seed)
    if a.embed:
        return C.LlamaLM(cfg).to(dev)
    return nn.ModuleDict(dict(layers=nn.ModuleList(C.Block(cfg) for _ in range(a.n_layers)))).to(dev)


def bench(a, dev, gt, log):
    specs = [s.strip() for s in a.optimizers.split(",") if s.strip()]
    master = make_model(a, dev)
    shapes = C.matrix_shapes(master)
    gen = torch.Generator().manual_seed(a.seed)
    grads = [[torch.randn(s, generator=gen).to(dev) for _, s, _ in shapes] for _ in range(a.pool)]
    log(f"{len(shapes)} tensors, {sum(p.numel() for p in master.parameters()) / 1e6:.1f}M "
        f"params ({sum(pr for *_, pr in shapes)} projected), pool of {a.pool} gradient sets")
    rows = []
    for spec in specs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, opt, label, cls = build(spec, copy.deepcopy(master), a, gt)
        except Exception as exc:  # noqa: BLE001 - reported in the log, the row left out
            log(f"  skip {spec}: {exc!r}")
            continue
        rows.append(dict(label=label, opt=opt, cls=cls, params=list(model.parameters()),
                         count=refresh_counter(opt, spec == "galore_torch"),
                         times=[], refreshed=[], warm=[], cpu=[]))
    if not rows:
        raise SystemExit("no optimizer could be built")

    def one_step(r, k):
        for p, g in zip(r["params"], grads[k % a.pool]):
            p.grad = g
        c0 = r["count"]()
        C.sync(dev)
        c_0, t0 = time.process_time(), time.perf_counter()
        r["opt"].step()
        C.sync(dev)
        r["cpu"].append(time.process_time() - c_0)
        return time.perf_counter() - t0, r["count"]() > c0

    for s in range(a.warmup):
        for r in rows:
            r["warm"].append(one_step(r, s)[0])
    n = a.steps or a.update_proj_gap
    gc.collect()
    gc.disable()
    try:
        for rep in range(a.repeats):
            t0 = time.perf_counter()
            for s in range(n):
                j = s % len(rows)
                for r in rows[j:] + rows[:j]:
                    dt, refreshed = one_step(r, a.warmup + rep * n + s)
                    r["times"].append(dt)
                    r["refreshed"].append(refreshed)
            gc.collect()
            log(f"  window {rep + 1}/{a.repeats}: {n} steps x {len(rows)} optimizers in "
                f"{time.perf_counter() - t0:.0f} s")
    finally:
        gc.enable()
    return rows, shapes, n


def tables(rows, shapes, n, a):
    ms = lambda x: "" if x is None else f"{1e3 * x:.1f}"
    for r in rows:
        t = r["times"]
        r["amortized"] = sum(t) / len(t)
        r["steady"] = statistics.median([x for x, f in zip(t, r["refreshed"]) if not f] or t)
        svd = [x for x, f in zip(t, r["refreshed"]) if f]
        r["svd"] = statistics.median(svd) if svd else None
        r["windows"] = [sum(t[i:i + n]) / n for i in range(0, len(t), n)]
    ref = rows[0]
    by = lambda key: next((r for r in rows if r["label"].startswith(key)), None)
    fused, gtr = by("adamw_fused"), by("galore_torch")
    ratio = lambda r, o: f"{r['amortized'] / o['amortized']:.2f}" if o else "n/a"
    time_rows = [[r["label"], ms(r["amortized"]),
                  "–".join(ms(f(r["windows"])) for f in (min, max)) if len(r["windows"]) > 1 else "",
                  ms(sum(r["cpu"][a.warmup:]) / len(r["times"])), ms(r["steady"]), ms(r["svd"]),
                  ms(max(r["times"])), f"{max(r['times']) / r['steady']:.2f}",
                  sum(r["refreshed"]), f"{1e3 * r['warm'][0]:.0f}" if r["warm"] else "",
                  ratio(r, ref), ratio(r, fused), ratio(r, gtr)] for r in rows]
    state_rows = []
    for r in rows:
        state, held = C.state_bytes(r["opt"]), C.state_bytes(r["opt"], held=True)
        closed = C.closed_form(r["cls"], shapes, a.rank, 4)[1] \
            if r["cls"] in C.CLOSED_FORM else None
        state_rows.append([r["label"], f"{state:,}", f"{state / 2 ** 20:.2f}",
                           "n/a" if closed is None else f"{closed:,}",
                           "n/a" if closed is None else "yes" if closed == state
                           else f"no ({state - closed:+,})",
                           f"{state / C.state_bytes(ref['opt']):.3f}", f"{held:,}",
                           f"{held / 2 ** 20:.2f}", f"{held / state:.2f}" if state else ""])
    return (C.md_table(["optimizer", "amortized ms/step", "window means ms", "amortized CPU ms",
                        "steady median ms", "SVD-step median ms", "max step ms", "max / steady",
                        "steps with SVD", "first step ms", f"× {ref['label']}",
                        "× adamw_fused", "× galore-torch"], time_rows),
            C.md_table(["optimizer", "state bytes (measured)", "MiB", "closed form bytes",
                        "agree", f"× {ref['label']}", "storage bytes held",
                        "storage MiB", "storage / state"], state_rows))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--quick", action="store_true", help=f"smoke test: {QUICK}, --out results/step_quick.md")
    add("--hidden", type=int, default=512)
    add("--intermediate", type=int, default=1376)
    add("--n-layers", type=int, default=8)
    add("--n-heads", type=int, default=8)
    add("--vocab", type=int, default=32000)
    add("--embed", action="store_true", help="the whole LlamaLM: embedding and head (plain) too")
    add("--rank", type=int, default=128)
    add("--update-proj-gap", type=int, default=200)
    add("--scale", type=float, default=0.25)
    add("--lr", type=float, default=1e-3)
    add("--steps", type=int, default=None, help="steps per timed window (default: the gap)")
    add("--repeats", type=int, default=2, help="timed windows")
    add("--warmup", type=int, default=3, help="untimed steps first (the first computes the bases)")
    add("--pool", type=int, default=4, help="gradient sets in the pool")
    add("--seed", type=int, default=0)
    add("--device", default="auto")
    add("--optimizers", default=DEFAULT, help="comma list: common.METHODS names (NAME+key=value "
        "allowed), floor, galore_torch; the first is the reference of the ratios")
    add("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    add("--out", default=None, help="Markdown output (default benchmarks/results/step.md)")
    a = ap.parse_args(argv)
    if a.quick:
        given = {x.split("=")[0] for x in (sys.argv[1:] if argv is None else argv)}
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(a, k, v)
    a.out = a.out or ("benchmarks/results/step_quick.md" if a.quick else "benchmarks/results/step.md")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, t0, load0 = torch.device(a.device), time.perf_counter(), os.getloadavg()[0]
    gt, gt_ver = import_galore_torch()
    log = lambda msg: print(msg, flush=True)
    rows, shapes, n = bench(a, dev, gt, log)
    t_table, s_table = tables(rows, shapes, n, a)
    load = max(load0, os.getloadavg()[0])
    meta = {"command": f"`{C.command_line('bench_step.py', argv)}`",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": f"{C.versions()}, galore-torch {gt_ver}",
            "device": f"{C.device_name(dev)}; load average up to {load:.2f}"
            + (" (**busy machine: timings are noisy**)" if load > 0.75 * (os.cpu_count() or 1) else ""),
            "total time": f"{time.perf_counter() - t0:.0f} s"}
    body = (f"## Optimizer step time\n\n{len(shapes)} tensors, "
            f"{sum(p.numel() for p in rows[0]['params']) / 1e6:.2f}M parameters "
            f"({sum(pr for *_, pr in shapes)} projected matrices), rank {a.rank}, update_proj_gap "
            f"{a.update_proj_gap}, scale {a.scale}; {a.warmup} warm-up steps, then {a.repeats} "
            f"window(s) of {n} steps, interleaved across optimizers (rotating order). Fixed random "
            f"gradients from a pool of {a.pool}; backward not timed. *amortized* = mean over all "
            "timed steps (SVD steps included); *steady* = median of the steps that refreshed no "
            "basis; *first step* = the warm-up step that computes every basis.\n\n"
            + "".join(f"- `{r['label']}`: {C.method(r['label']).description}\n" for r in rows
                      if r["label"].split("+")[0] in C.METHODS) + "\n"
            f"{t_table}\n\n## Optimizer state\n\nBytes of every tensor in `optimizer.state` "
            "(shared tensors once; *held*: whole storages) and `common.closed_form`.\n\n"
            f"{s_table}\n")
    print(C.write_report(a.out, "bench_step: optimizer step time and state", meta, body))
    log(f"written to {a.out}")


if __name__ == "__main__":
    main()
