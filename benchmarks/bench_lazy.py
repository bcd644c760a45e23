"""Q-GaLore's lazy layer-wise subspace refresh: SVDs saved, loss kept, step time.

Trains the ``small`` LLaMA-style config of ``benchmarks/common.py`` (byte vocabulary) on
the stdlib corpus (``common.load_corpus``) three times, with the same seed, the same
initial weights and the same batches in the same order:

* ``lazy``   -- ``QGaLoreAdamW8bit`` on ``lo.quantize_weights(model)`` (INT8 attention/MLP
  weights, INT4 bases, 8-bit moments, stochastic rounding), ``gamma_proj=2`` (lazy
  refresh, the default: a matrix's gap doubles once its last ``queue_size`` subspace
  overlaps average >= ``cos_threshold``);
* ``fixed``  -- the same with ``gamma_proj=1`` (the gap never grows: GaLore's fixed gap);
* ``galore`` -- ``GaLoreAdamW`` on the float32 model (fixed gap), for the step time.

Both Q-GaLore runs and GaLore use the papers' param groups (attention and MLP matrices
projected, embedding/norms/head plain), rank ``--rank``, gap ``--update-proj-gap``,
scale 0.25, linear warmup and cosine decay to 10% (``common.lr_lambda``), no clipping.
The three runs are interleaved step by step (at each step index every run takes one
step, in a rotating order) so that the load of a shared machine hits them alike.

Reported: total SVDs (sum of ``state["refresh_count"]`` over projected matrices),
validation loss (mean cross-entropy, nats/byte, on fixed validation windows) during and
at the end of training, the relative difference lazy vs fixed, the subspace overlaps
seen at the refreshes, the final per-matrix gaps, and the mean optimizer step time
(``opt.step()`` only; the first step, which computes every basis, excluded) with the
time spent in SVDs (``lowrank_optim.projector.compute_basis`` wrapped with a timer) and
the step time without it; plus the mean time of a whole training step (forward +
backward + step). Results are printed as
Markdown and written, with versions, device, date and the command line, to ``--out``.

Targets of the issue: lazy refresh >= 50% fewer SVDs than the fixed gap, validation
loss within 1%.

Command lines (from the repository root):

    python benchmarks/bench_lazy.py                          # defaults below, ~10 min on 1 thread of an idle CPU
    python benchmarks/bench_lazy.py --steps 100 --out /tmp/lazy.md   # smoke test
    python benchmarks/bench_lazy.py --update-proj-gap 50 --steps 1000
    python benchmarks/bench_lazy.py --runs lazy,fixed        # skip the GaLore timing run
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time

# -------------------------------------------------------------------------------------
# defaults
config = "small"          # common.CONFIGS: 256 hidden, 6 layers, 4 heads, 688 MLP, bytes
steps = 400
update_proj_gap = 20
rank = 64
lr = 1e-2                 # GaLore's lr; Q-GaLore's reference uses 0.015 at 60M/130M
scale = 0.25
warmup = 40
batch_size = 8
seq_len = 64
eval_every = 100
eval_batches = 16
cos_threshold = 0.4       # Q-GaLore defaults
queue_size = 5
seed = 0
threads = 1
runs = "lazy,fixed,galore"
data = None               # None: the stdlib corpus
out = "benchmarks/results/lazy.md"
# -------------------------------------------------------------------------------------

from _paths import ROOT

import torch
from torch import nn

import lowrank_optim as lo
import common as C

TARGETS = ("attn", "mlp")

# Time spent in SVDs, attributed to the run that is stepping: the package's projector looks
# ``compute_basis`` up in its module at each refresh, so wrapping it here times every basis
# computation without touching the package.
_CURRENT = {"run": None}
_compute_basis = lo.projector.compute_basis


def _timed_compute_basis(*args, **kwargs):
    t0 = time.perf_counter()
    try:
        return _compute_basis(*args, **kwargs)
    finally:
        if _CURRENT["run"] is not None:
            _CURRENT["run"].svd_time_now += time.perf_counter() - t0


lo.projector.compute_basis = _timed_compute_basis
LABELS = {
    "lazy": "QGaLoreAdamW8bit, gamma_proj=2 (lazy)",
    "fixed": "QGaLoreAdamW8bit, gamma_proj=1 (fixed gap)",
    "galore": "GaLoreAdamW, float32 model (fixed gap)",
}


def groups(model: nn.Module, a) -> list[dict]:
    """The papers' groups: a plain group, then attention + MLP matrices with ``rank``."""
    return lo.param_groups(model, rank=a.rank, target_modules=TARGETS,
                           update_proj_gap=a.update_proj_gap, scale=a.scale)


class Run:
    def __init__(self, name: str, a, corpus: C.Corpus, cfg):
        self.name = name
        torch.manual_seed(a.seed)
        model = C.LlamaLM(cfg)
        if name == "galore":
            opt = lo.GaLoreAdamW(groups(model, a), lr=a.lr)
        else:
            lo.quantize_weights(model, bits=8, group_size=256, target_modules=TARGETS)
            opt = lo.QGaLoreAdamW8bit(groups(model, a), lr=a.lr, seed=a.seed,
                                      gamma_proj=2 if name == "lazy" else 1,
                                      cos_threshold=a.cos_threshold, queue_size=a.queue_size)
        self.model, self.opt = model, opt
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(a.warmup, a.steps))
        self.batches = C.Batches(corpus, a.batch_size, a.seq_len, a.seed, a.eval_batches,
                                 torch.device("cpu"))
        self.proj = opt.param_groups[1]["params"]
        self.step_times, self.svd_step, self.iter_times, self.svd_times = [], [], [], []
        self.svd_time_now = 0.0
        self.overlaps, self.curve, self.train_loss = [], [], []
        self.nonfinite = False

    def svds(self) -> int:
        return sum(self.opt.state[p].get("refresh_count", 0) for p in self.proj)

    def train_step(self) -> None:
        t0 = time.perf_counter()
        x, y = self.batches.next_train()
        loss = self.model(x, y)
        loss.backward()
        before = self.svds()
        self.svd_time_now, _CURRENT["run"] = 0.0, self
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        _CURRENT["run"] = None
        self.svd_times.append(self.svd_time_now)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_times.append(t2 - t1)
        self.iter_times.append(time.perf_counter() - t0)
        self.svd_step.append(self.svds() - before)
        v = loss.item()
        self.train_loss.append(v)
        self.nonfinite |= not math.isfinite(v)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.model(x, y).item() for x, y in self.batches.val]
        self.model.train()
        return sum(losses) / len(losses)


def _record_overlaps(run: Run, seen: dict) -> None:
    """Append the overlap of every matrix refreshed since the last call (refreshes after
    the first one carry a similarity: the last entry of ``refresh_sims``)."""
    for p in run.proj:
        st = run.opt.state[p]
        n = st.get("refresh_count", 0)
        if n > seen.get(id(p), 0) and n > 1 and st.get("refresh_sims"):
            run.overlaps.append(st["refresh_sims"][-1])
        seen[id(p)] = n






def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=config)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--update-proj-gap", type=int, default=update_proj_gap)
    ap.add_argument("--rank", type=int, default=rank)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--scale", type=float, default=scale)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--eval-every", type=int, default=eval_every)
    ap.add_argument("--eval-batches", type=int, default=eval_batches)
    ap.add_argument("--cos-threshold", type=float, default=cos_threshold)
    ap.add_argument("--queue-size", type=int, default=queue_size)
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--threads", type=int, default=threads, help="torch threads (0: default)")
    ap.add_argument("--runs", default=runs, help="comma list of lazy, fixed, galore")
    ap.add_argument("--data", default=data, help="text file or folder (default: stdlib)")
    ap.add_argument("--out", default=out, help="Markdown output ('' to skip writing)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [r.strip() for r in a.runs.split(",") if r.strip()]
    for n in names:
        if n not in LABELS:
            ap.error(f"unknown run {n!r}; choose from {', '.join(LABELS)}")
    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)]
                                + (sys.argv[1:] if argv is None else list(argv)))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load0 = os.getloadavg()
    t_start = time.time()

    corpus = C.load_corpus(a.data)
    cfg = C.get_config(a.config, seq_len=max(a.seq_len, C.get_config(a.config).seq_len))
    print(corpus.describe(), flush=True)
    rs = [Run(n, a, corpus, cfg) for n in names]
    seen = {r.name: {} for r in rs}
    for r in rs:
        r.curve.append((0, r.evaluate()))
    for step in range(a.steps):
        k = step % len(rs)
        for r in rs[k:] + rs[:k]:  # rotating order
            r.train_step()
            _record_overlaps(r, seen[r.name])
        last = step + 1 == a.steps
        if (a.eval_every and (step + 1) % a.eval_every == 0) or last:
            for r in rs:
                r.curve.append((step + 1, r.evaluate()))
            print(f"step {step + 1:5d}  " + "  ".join(
                f"{r.name}: val {r.curve[-1][1]:.4f} svds {r.svds()}" for r in rs)
                + f"  ({time.time() - t_start:.0f} s)", flush=True)
    load1 = os.getloadavg()
    md = render(a, rs, corpus, cfg, cmd, date, load0, load1, time.time() - t_start)
    print()
    print(md)
    if a.out:
        path = a.out if os.path.isabs(a.out) else os.path.join(ROOT, a.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(md)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def render(a, rs, corpus, cfg, cmd, date, load0, load1, secs) -> str:
    import bitsandbytes as bnb

    by = {r.name: r for r in rs}
    L = []
    add = L.append
    add("# bench_lazy: Q-GaLore lazy subspace refresh vs fixed gap\n")
    add(f"- command: `{cmd}`")
    add(f"- date: {date}; total time {secs:.0f} s")
    add(f"- torch {torch.__version__}, bitsandbytes {bnb.__version__}, lowrank_optim "
        f"{lo.__version__} (git {C.git_rev()}), Python {platform.python_version()}")
    add(f"- device: cpu ({C.cpu_name()}), {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end"
        + (" (**busy machine: timings are noisy**)" if max(load0[0], load1[0]) > 1.5 * (
            os.cpu_count() or 1) / 2 else ""))
    nproj = len(rs[0].proj)
    add(f"- model: `common.py` config `{a.config}` (dim {cfg.dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads, MLP {cfg.mlp_hidden}, byte vocabulary {cfg.vocab_size}); "
        f"{nproj} projected matrices (attention + MLP)")
    add(f"- data: {corpus.describe()}")
    add(f"- training: {a.steps} steps × batch {a.batch_size} × {a.seq_len} tokens, lr {a.lr} "
        f"(warmup {a.warmup}, cosine to 10%), rank {a.rank}, update_proj_gap {a.update_proj_gap}, "
        f"scale {a.scale}, stagger on (package default), Q-GaLore cos_threshold "
        f"{a.cos_threshold}, queue_size {a.queue_size}, stochastic rounding, seed {a.seed}; "
        f"no clipping; runs interleaved step by step")
    add("")
    add("## SVDs and validation loss\n")
    add("*SVDs*: sum of `state['refresh_count']` over the projected matrices (the first "
        "refresh at step 0 included). *overlap*: subspace overlap "
        "‖P_oldᵀP_new‖²_F / r at every refresh after the first (what LazyCosine compares "
        "with cos_threshold). *final gaps*: `state['refresh_gap']` (absent = never grown).\n")
    add("| run | SVDs | SVDs vs fixed | val loss (nats/byte) | val ppl | Δ loss vs fixed "
        "| overlap mean (min–max) | final gaps | train loss, last 50 steps |")
    add("|---|---|---|---|---|---|---|---|---|")
    fixed = by.get("fixed")
    for r in rs:
        val = r.curve[-1][1]
        rel = (f"{100 * (val - fixed.curve[-1][1]) / fixed.curve[-1][1]:+.2f}%"
               if fixed is not None else "–")
        svd_rel = (f"{100 * (r.svds() - fixed.svds()) / fixed.svds():+.1f}%"
                   if fixed is not None else "–")
        ov = (f"{statistics.mean(r.overlaps):.3f} ({min(r.overlaps):.2f}–{max(r.overlaps):.2f})"
              if r.overlaps else "–")
        gaps = [r.opt.state[p].get("refresh_gap", a.update_proj_gap) for p in r.proj]
        hist = {}
        for g in gaps:
            hist[g] = hist.get(g, 0) + 1
        gtxt = ", ".join(f"{g}×{n}" for g, n in sorted(hist.items()))
        tl = statistics.mean(r.train_loss[-50:])
        add(f"| {LABELS[r.name]} | {r.svds()} | {svd_rel} | {val:.4f} | {math.exp(val):.3f} "
            f"| {rel} | {ov} | {gtxt} | {tl:.4f}{' (non-finite seen)' if r.nonfinite else ''} |")
    add("")
    if "lazy" in by and fixed is not None:
        lz = by["lazy"]
        fewer = 100 * (1 - lz.svds() / fixed.svds())
        dl = 100 * abs(lz.curve[-1][1] - fixed.curve[-1][1]) / fixed.curve[-1][1]
        add(f"**Targets:** lazy refresh uses {fewer:.1f}% fewer SVDs than the fixed gap "
            f"(target ≥ 50%: {'met' if fewer >= 50 else 'NOT met'}); validation loss differs "
            f"by {dl:.2f}% (target within 1%: {'met' if dl <= 1 else 'NOT met'}).")
        add("")
    add("Validation loss during training:\n")
    add("| step | " + " | ".join(r.name for r in rs) + " |")
    add("|---|" + "---|" * len(rs))
    for i, (s, _) in enumerate(rs[0].curve):
        add(f"| {s} | " + " | ".join(f"{r.curve[i][1]:.4f}" for r in rs) + " |")
    add("")
    add("## Optimizer step time\n")
    add("`opt.step()` wall time, the first step (every basis computed) excluded. *SVD*: time "
        "inside the package's `compute_basis` (timed by wrapping it), per step; *without SVD*: "
        "step time minus that, i.e. projection, Adam, the update and (Q-GaLore) dequantizing "
        "the INT4 basis and the INT8 weight and requantizing the weight by stochastic rounding; "
        "*training step*: forward + backward + step + zero_grad (the Q-GaLore backward also "
        "dequantizes each INT8 weight). With `stagger` on, a fixed gap spreads the SVDs over "
        "every step.\n")
    add("| run | mean step ms | × GaLoreAdamW | SVDs per step | SVD ms per step | without SVD ms "
        "| × GaLoreAdamW | training step ms | × GaLoreAdamW |")
    add("|---|---|---|---|---|---|---|---|---|")
    g = by.get("galore")

    def stats(r):
        st, sv, it = r.step_times[1:], r.svd_times[1:], r.iter_times[1:]
        return (statistics.mean(st), statistics.mean(sv),
                statistics.mean(t - s for t, s in zip(st, sv)), statistics.mean(it),
                statistics.mean(r.svd_step[1:]))
    gs = stats(g) if g else None
    x = lambda v, ref: f"{v / ref:.2f}" if ref else "–"
    for r in rs:
        m, sv, ns, it, nsvd = stats(r)
        add(f"| {LABELS[r.name]} | {_ms(m)} | {x(m, gs and gs[0])} | {nsvd:.2f} | {_ms(sv)} | "
            f"{_ms(ns)} | {x(ns, gs and gs[2])} | {_ms(it)} | {x(it, gs and gs[3])} |")
    add("")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
