"""The main job: train one small LLaMA-style model with each optimizer and compare validation
loss, time per step, exact bytes and peak memory. What it measures and how: the
"shootout.py" section of docs/benchmarks.md.

    python benchmarks/shootout.py                      # the default methods, ~17 min on 2 CPU cores
    python benchmarks/shootout.py --methods adamw,galore --steps 200
    python benchmarks/shootout.py --config small --device cuda --steps 2000
    python benchmarks/shootout.py --data ~/my_text_folder --config llama_60m --vocab-size 256
    python benchmarks/shootout.py --lr-sweep 0.5,1,2 --seeds 0,1,2   # tuned rates, 3 seeds
    python benchmarks/shootout.py --methods galore+state_on_refresh=keep,galore+state_on_refresh=project
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _paths import HERE, ROOT

import torch

import common as C

MIN_LR_RATIO = 0.1   # the cosine decay ends at this fraction of the peak rate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shootout.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--methods", help=f"comma list of {', '.join(C.METHODS)}, each optionally with "
        "optimizer keywords NAME+key=value+... (default: the registry's default methods whose "
        "packages are installed)")
    add("--config", default="tiny", help=f"model size: {', '.join(C.CONFIGS)}")
    add("--vocab-size", type=int, default=256, help="embedding/head rows (tokens are bytes)")
    add("--steps", type=int, default=500, help="training steps per method")
    add("--batch-size", type=int, default=16, help="sequences per step")
    add("--seq-len", type=int, help="default: the config's")
    add("--lr", help="peak lr for every method (3e-3) or per method (adamw=3e-3,galore=1e-2); "
        "default: the registry's")
    add("--lr-sweep", metavar="GRID", help="tune the rates on the first seed first: "
        "multipliers of each method's rate (0.5,1,2) and/or METHOD=LR:LR:...; the lowest loss "
        "on the selection windows wins; variants whose parent runs take its rate")
    add("--clip", type=float, default=1.0, help="clip_grad_norm_ of all gradients before "
        "opt.step(); per-layer methods clip each parameter's gradient instead; 0: off")
    add("--warmup", type=int, help="linear warmup steps, then cosine decay to 0.1 x lr "
        "(default: 10%% of --steps)")
    add("--weight-decay", type=float, default=0.0, help="decoupled")
    add("--rank", type=int, help="low-rank rank (default: dim // 4)")
    add("--update-proj-gap", type=int, default=200, help="steps between basis refreshes")
    add("--scale", type=float, default=0.25, help="GaLore scale")
    add("--eval-every", type=int, default=50, help="validation every N steps and at the end")
    add("--eval-batches", type=int, default=8, help="fixed validation batches")
    add("--seed", type=int, default=0, help="model init and data order")
    add("--seeds", help="comma list (0,1,2): every method runs once per seed, the table "
        "gives the means (default: --seed)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--dtype", default="float32", choices=("float32", "bfloat16"),
        help="parameter dtype (bfloat16: pure-bf16 training; the loss in float32)")
    add("--threads", type=int, help="torch.set_num_threads (1 when other jobs share the cores)")
    add("--data", help="text file or folder (default: the Python stdlib's .py files)")
    add("--out", help="results folder (default: runs/shootout-<time>)")
    add("--in-process", action="store_true",
        help="run the methods in this process (peak memory then only indicative)")
    add("--malloc-default", action="store_true", help="CPU: keep glibc's dynamic mmap "
        "threshold in the workers (peak RSS then counts heap fragmentation)")
    add("--no-plot", action="store_true", help="skip the PNG")
    add("--quiet", action="store_true", help="no progress lines")
    add("--report-from", metavar="RESULTS_JSON",
        help="train nothing: write the report again from an earlier run's results.json")
    add("--resume", metavar="PARTIAL_JSON", help="reuse the runs of a run cut short (its "
        "partial.json); the runs must agree on all but --out, --resume, --methods and the "
        "--lr-sweep grid")
    add("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if min(a.steps, a.batch_size, a.eval_every, a.eval_batches) < 1:
        p.error("--steps, --batch-size, --eval-every and --eval-batches must be >= 1")
    if a.vocab_size < 256 or not a.clip >= 0:
        p.error("--vocab-size must be >= 256 (tokens are bytes), --clip >= 0 (0: off)")
    return a


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other arguments; check methods, seeds and rates."""
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    default = ",".join(n for n, m in C.METHODS.items() if m.default and m.available())
    names = [n.strip() for n in (a.methods or default).split(",") if n.strip()]
    if not names:
        raise SystemExit(f"--methods: choose from {', '.join(C.METHODS)}")
    try:
        cfg = C.get_config(a.config, vocab_size=a.vocab_size)
        methods = {n: C.method(n) for n in names}
    except ValueError as e:
        raise SystemExit(str(e))
    missing = [f"{n} (needs {', '.join(m.requires)})" for n, m in methods.items()
               if not m.available()]
    if missing:
        raise SystemExit(f"not available here: {', '.join(missing)}")
    a.seq_len = a.seq_len or cfg.seq_len
    a.rank = a.rank or max(1, cfg.dim // 4)
    a.warmup = max(1, a.steps // 10) if a.warmup is None else a.warmup
    a.method_list = names
    try:
        a.seed_list = [int(x) for x in a.seeds.split(",") if x.strip()] if a.seeds else [a.seed]
    except ValueError:
        raise SystemExit(f"--seeds: expected a comma list of integers, got {a.seeds!r}")
    if not a.seed_list or len(set(a.seed_list)) != len(a.seed_list):
        raise SystemExit(f"--seeds: expected distinct integers, got {a.seeds!r}")
    a.lrs = {n: m.lr for n, m in methods.items()}
    for item in filter(str.strip, (a.lr or "").split(",")):
        if "=" not in item:                   # one rate for every method
            a.lrs = dict.fromkeys(names, float(item))
            continue
        k, v = (x.strip() for x in item.rsplit("=", 1))
        if k not in C.METHODS and k not in names:
            raise SystemExit(f"--lr: unknown method {k!r}")
        if k in a.lrs:
            a.lrs[k] = float(v)
    a.sweep_grid, a.inherits = parse_sweep(a.lr_sweep, names, a.lrs) if a.lr_sweep else ({}, {})
    return a


def parse_sweep(spec: str, names: list[str], lrs: dict) -> tuple[dict, dict]:
    """``--lr-sweep`` -> (``{method: [rates]}`` for the methods swept, ``{variant:
    parent}`` for the variants that take their parent's best rate)."""
    mults, explicit = [], {}
    try:
        for item in filter(None, (x.strip() for x in spec.split(","))):
            if "=" not in item:
                mults.append(float(item))
                continue
            k, v = (x.strip() for x in item.rsplit("=", 1))
            if k not in C.METHODS and k not in names:
                raise SystemExit(f"--lr-sweep: unknown method {k!r}")
            explicit[k] = [float(x) for x in v.split(":") if x.strip()]
    except ValueError:
        raise SystemExit(f"--lr-sweep: expected multipliers (0.5,1,2) and/or METHOD=LR:LR:..., "
                         f"got {spec!r}")
    if any(not r > 0 for r in mults + sum(explicit.values(), [])):
        raise SystemExit(f"--lr-sweep: rates and multipliers must be > 0, got {spec!r}")
    inherits = {n: C.method(n).parent for n in names
                if C.method(n).parent in names and n not in explicit}
    grid = {n: sorted({float(f"{r:.6g}") for r in (
        explicit.get(n) or [lrs[n] * m for m in mults] or [lrs[n]])})
        for n in names if n not in inherits}
    return grid, inherits


# ---------------------------------------------------------------------------------------
# One method's run
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, windows) -> float:
    """Mean loss over ``windows``' batches, in eval mode."""
    was_training = model.training
    model.eval()
    losses = [model(x, y).item() for x, y in windows]
    model.train(was_training)
    return sum(losses) / len(losses)


def _warm_up(method: C.Method, args: argparse.Namespace, device: torch.device) -> None:
    """Two steps of the method on a throwaway small model, before memory is measured: the
    kernels' code pages and CUDA's context then sit in the baseline, not in the peak."""
    cfg = C.get_config("tiny", vocab_size=args.vocab_size, seq_len=32)
    model = C.LlamaLM(cfg).to(device=device, dtype=getattr(torch, args.dtype))
    prep = method.build(model, C.MethodArgs(lr=1e-4, rank=min(args.rank, cfg.dim // 4)))
    idx = torch.randint(0, 256, (2, 33), device=device)
    for _ in range(2):
        prep.model(idx[:, :-1], idx[:, 1:]).backward()
        if not prep.per_layer:
            prep.optimizer.step()
            prep.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        prep.model(idx[:, :-1], idx[:, 1:])
    if prep.hooks is not None:
        prep.hooks.remove()
    del model, prep
    gc.collect()
    C.release_memory(device)


def model_config(args: argparse.Namespace) -> C.ModelConfig:
    """The run's model: ``args.config`` with its vocabulary and a rotary table long enough
    for ``--seq-len``."""
    return C.get_config(args.config, vocab_size=args.vocab_size,
                        seq_len=max(args.seq_len, C.get_config(args.config).seq_len))


def run_method(name: str, args: argparse.Namespace, corpus: C.Corpus | None = None) -> dict:
    """Train ``args.config`` with method ``name``; return the measurements as a dict."""
    device = torch.device(args.device)
    corpus = corpus if corpus is not None else C.load_corpus(args.data)
    method, clip = C.method(name), args.clip
    _warm_up(method, args, device)
    meter = C.MemoryMeter(device)
    meter.start()

    torch.manual_seed(args.seed)
    model = C.LlamaLM(model_config(args)).to(device=device, dtype=getattr(torch, args.dtype))
    prep = method.build(model, C.MethodArgs(
        lr=args.lrs[name], rank=args.rank, update_proj_gap=args.update_proj_gap,
        scale=args.scale, weight_decay=args.weight_decay, max_grad_norm_per_param=clip or None))
    model, opt, per_layer = prep.model, prep.optimizer, prep.per_layer
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, C.lr_lambda(args.warmup, args.steps, MIN_LR_RATIO))
    batches = C.Batches(corpus, args.batch_size, args.seq_len, args.seed, args.eval_batches,
                        device)
    t_fwd, t_bwd, t_opt, t_all = (C.Timer(device) for _ in range(4))
    curve, train_loss, grad_norms, diverged = [(0, evaluate(model, batches.val))], [], [], None
    every = max(1, args.steps // 10)
    model.train()
    for step in range(1, args.steps + 1):
        with t_all:
            x, y = batches.next_train()
            with t_fwd:
                loss = model(x, y)
            with t_bwd:
                loss.backward()        # per-layer mode: parameters are updated in here
            if not per_layer:
                if clip:  # timed with the iteration (tokens/s), not in the step's column
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(
                        model.parameters(), clip).item())
                with t_opt:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            sched.step()
            loss_v = loss.item()
        if step == 1:  # the first step (lazy state, first SVDs) is not timed
            for t in (t_fwd, t_bwd, t_opt, t_all):
                t.total, t.count = 0.0, 0
        train_loss.append(loss_v)
        diverged = None if math.isfinite(loss_v) else step
        if step % args.eval_every == 0 or step == args.steps or diverged:
            curve.append((step, evaluate(model, batches.val)))
        if not args.quiet and (step % every == 0 or step == args.steps):
            print(f"  {name}: step {step}/{args.steps}  train {loss_v:.4f}  "
                  f"val {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
        if diverged:
            break

    select = evaluate(model, batches.select) if getattr(args, "select_eval", False) else None
    ms = lambda t: 1000 * t.total / t.count if t.count else None
    peak, weights = meter.peak(), C.weight_bytes(model)
    grads, state = C.grad_bytes(model, per_layer=per_layer), C.state_bytes(opt)
    above = None if peak is None else peak - meter.baseline
    trained = [p for p in model.parameters() if p.requires_grad]
    if prep.hooks is not None:
        prep.hooks.remove()
    return dict(
        method=name, description=method.description, lr=args.lrs[name], per_layer=per_layer,
        params=C.count_params(model), val_loss=curve[-1][1],
        val_ppl=math.exp(min(curve[-1][1], 700)), curve=curve, train_loss=train_loss,
        diverged_at=diverged,
        tokens_per_s=args.batch_size * args.seq_len * t_all.count / t_all.total
        if t_all.count else None,
        fwd_ms=ms(t_fwd), bwd_ms=ms(t_bwd), step_ms=None if per_layer else ms(t_opt),
        bwd_step_ms=(ms(t_bwd) or 0) + (0 if per_layer else ms(t_opt) or 0),
        iter_ms=1000 * t_all.total / max(1, t_all.count),
        weights_b=weights, grads_b=grads, state_b=state, peak_b=peak,
        baseline_b=meter.baseline, peak_above_b=above,
        act_other_b=None if above is None else above - weights - grads - state,
        memory_kind=meter.kind, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        select_loss=select,
        select_disjoint=batches.select_disjoint,
        clipping="none" if not clip else "per-parameter" if per_layer else "global", clip=clip,
        trained_params=len(trained), trained_numel=sum(p.numel() for p in trained),
        svds=sum(int(st.get("refresh_count", 0)) for st in opt.state.values()),
        grad_norm_mean=statistics.fmean(grad_norms) if grad_norms else None,
        clipped_frac=sum(g > clip for g in grad_norms) / len(grad_norms) if grad_norms else None,
        corpus=corpus.describe(), device_name=C.device_name(args.device), error=None)


def _run_guarded(name: str, args: argparse.Namespace, corpus=None) -> dict:
    try:
        return run_method(name, args, corpus)
    except Exception as e:  # reported in the table; the traceback goes to stderr
        traceback.print_exc()
        return dict(method=name, error=f"{type(e).__name__}: {e}")


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    args = parse_args([])            # defaults, then the parent's resolved arguments
    vars(args).update(spec["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(spec["result"]).write_text(json.dumps(_run_guarded(spec["method"], args)))
    return 0


def _run_subprocess(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    """One run in its own process, so that peak memories do not mix. On CPU the worker gets
    glibc's ``MALLOC_MMAP_THRESHOLD_=131072``: freed tensors go back to the system and peak
    RSS follows live memory, not heap fragmentation."""
    spec, res = tmp / f"{name}.{args.seed}.spec.json", tmp / f"{name}.{args.seed}.result.json"
    res.unlink(missing_ok=True)  # the same method and seed may run at several rates
    spec.write_text(json.dumps(dict(args=vars(args), method=name, result=str(res))))
    env = dict(os.environ)
    if args.device == "cpu" and not args.malloc_default:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec)],
                          env=env)
    if res.exists():
        return json.loads(res.read_text())
    return dict(method=name, error=f"worker exited with status {proc.returncode}")


# ---------------------------------------------------------------------------------------
# Seeds, estimates and targets
# ---------------------------------------------------------------------------------------

# averaged over seeds; the byte counts are the same for every seed, the peak is the largest
_MEAN_KEYS = ("val_loss", "val_ppl", "tokens_per_s", "fwd_ms", "bwd_ms", "step_ms",
              "bwd_step_ms", "iter_ms", "wall_s", "grad_norm_mean", "clipped_frac", "svds")


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per method from its runs (one per seed): the mean of the quality and time
    measurements and of the validation curve, the largest peak, and the per-seed
    perplexities (``val_ppl_seeds``, ``val_ppl_std``). A failed seed fails the method."""
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == name]
        bad = next((r for r in rs if r.get("error")), None)
        if len(rs) == 1 or bad:
            rows.append(rs[0] if len(rs) == 1 else dict(
                method=name, seeds=[r["seed"] for r in rs],
                error=f"seed {bad['seed']}: {bad['error']}"))
            continue
        row = dict(rs[0], seeds=[r["seed"] for r in rs],
                   val_ppl_seeds=[r["val_ppl"] for r in rs],
                   val_ppl_std=statistics.stdev(r["val_ppl"] for r in rs),
                   diverged_at=next((r["diverged_at"] for r in rs if r["diverged_at"]), None))
        for k in _MEAN_KEYS:
            vals = [r.get(k) for r in rs]
            row[k] = None if None in vals else statistics.fmean(vals)
        if None not in (peaks := [r["peak_b"] for r in rs]):
            worst = rs[peaks.index(max(peaks))]
            row.update({k: worst[k] for k in ("peak_b", "baseline_b", "peak_above_b",
                                              "act_other_b")})
        curves = [r["curve"] for r in rs]
        if all([s for s, _ in c] == [s for s, _ in curves[0]] for c in curves):
            row["curve"] = [(s, statistics.fmean(c[i][1] for c in curves))
                            for i, (s, _) in enumerate(curves[0])]
        rows.append(row)
    return rows


def add_estimates(results: list[dict], args: argparse.Namespace) -> None:
    """Set each result's ``estimate_b`` (weights + grads + state + saved activations, the
    papers' sum) and ``peak_model_b`` from ``estimate_memory.py``; None for a method it
    does not model."""
    import estimate_memory as E
    cfg, dt = model_config(args), getattr(torch, args.dtype)
    todo = [r for r in results if not r.get("error") and r["method"] in E.METHODS]
    acts = E.activation_bytes(cfg, args.batch_size, args.seq_len, dt, False) if todo else 0
    for r in results:
        r["estimate_b"] = r["peak_model_b"] = None
    for r in todo:
        r["estimate_b"] = sum(E.estimate(r["method"], cfg, args.rank, dt, acts).values())
        r["peak_model_b"] = E.peak_model(r["method"], cfg, args.rank, dt, args.batch_size,
                                         args.seq_len, device="cpu" if args.device == "cpu"
                                         else "cuda")["peak"]


# the targets for the main job (#7): (description, check(results by method) ->
# (measured text, met: True/False, or None when this run cannot decide), or None when a
# method it needs was not run)
def _ppl_target(name, ref, limit):
    def check(by):
        if name not in by or ref not in by:
            return None
        q = by[name]["val_ppl"] / by[ref]["val_ppl"]
        text = f"{q:.3f}× ({by[name]['val_ppl']:.3f} / {by[ref]['val_ppl']:.3f})"
        seeds = min(len(by[n].get("seeds", [0])) for n in (name, ref))
        if seeds < 3:  # the quality targets are on the mean of 3 seeds
            return f"{text}, {seeds} seed(s): run --seeds 0,1,2 to check", None
        return text, q <= limit
    return f"{name} validation ppl ≤ {limit:g}× {ref}'s", check


def _peak_below_adamw(by):
    low = [n for n in by if n.startswith(("galore", "qgalore", "loqt"))]
    if "adamw" not in by or not low or by["adamw"].get("peak_above_b") is None:
        return None
    q = {n: by[n]["peak_above_b"] / by["adamw"]["peak_above_b"] for n in low}
    return ", ".join(f"{n} {v:.2f}×" for n, v in q.items()), all(v < 1 for v in q.values())


def _qgalore_per_layer_lowest(by):
    name = "qgalore_per_layer"
    if name not in by or len(by) < 2 or by[name].get("peak_above_b") is None:
        return None
    low = min(by, key=lambda n: by[n]["peak_above_b"])
    return (f"lowest: {low} ({by[low]['peak_above_b'] / 2 ** 20:.1f} MiB); {name} "
            f"{by[name]['peak_above_b'] / 2 ** 20:.1f} MiB"), low == name


def _estimate_agrees(by):
    q = {n: r["peak_above_b"] / r["peak_model_b"] for n, r in by.items()
         if r.get("peak_model_b") and r.get("peak_above_b") is not None}
    return (", ".join(f"{n} {v:.2f}×" for n, v in q.items()),
            all(abs(v - 1) <= 0.1 for v in q.values())) if q else None


def _galore_speed(by):
    if "galore" not in by or "adamw" not in by or not by["adamw"].get("tokens_per_s"):
        return None
    q = by["galore"]["tokens_per_s"] / by["adamw"]["tokens_per_s"]
    return f"{q:.2f}×", q >= 0.9


TARGETS = [
    _ppl_target("galore", "adamw", 1.03),
    _ppl_target("qgalore", "galore", 1.02),
    _ppl_target("loqt", "galore", 1.0),
    ("peak memory above baseline of every low-rank method < adamw's", _peak_below_adamw),
    ("qgalore_per_layer has the lowest peak memory above baseline", _qgalore_per_layer_lowest),
    ("peak memory above baseline within 10% of estimate_memory.py's peak model",
     _estimate_agrees),
    ("galore tokens/s ≥ 0.9× adamw's", _galore_speed),
]


def target_table(results: list[dict]) -> str:
    """The targets that the methods run here can check, as a Markdown table ('' if none)."""
    by = {r["method"]: r for r in results if not r.get("error")}
    rows = []
    for what, check in TARGETS:
        if (got := check(by)) is not None:
            rows.append([what, got[0], "–" if got[1] is None else "yes" if got[1] else "**no**"])
    return C.md_table(["target", "measured", "met"], rows) if rows else ""


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def _mib(b):
    return "—" if b is None else f"{b / 2 ** 20:.2f}"


def _num(v, fmt):
    return "—" if v is None else format(v, fmt)


def _ratio(v, ref):
    return "—" if v is None or not ref else f"{v / ref:.2f}×"


def _clip_cell(r: dict) -> str:
    kind = r.get("clipping", "none")
    return kind if kind == "none" else \
        f"{'per-param' if kind == 'per-parameter' else kind} {r['clip']:g}"


def make_table(results: list[dict]) -> str:
    """The quality-and-time table and the memory table, one row per method."""
    ok = [r for r in results if not r.get("error")]
    ref = next((r for r in ok if r["method"] == "adamw"), ok[0] if ok else None)
    rname = ref["method"] if ref else "adamw"
    name = lambda r: r["method"] + (" ¹" if r.get("per_layer") else "")
    quality = []
    for r in results:
        if r.get("error"):
            quality.append([r["method"], f"failed: {r['error']}"] + [""] * 11)
            continue
        div = f" (diverged at {r['diverged_at']})" if r.get("diverged_at") else ""
        std = f" ± {r['val_ppl_std']:.3f}" if "val_ppl_std" in r else ""
        pl = r["per_layer"]
        quality.append([
            name(r), f"{r['lr']:g}", _clip_cell(r), f"{r['val_loss']:.4f}{div}",
            f"{r['val_ppl']:.3f}{std}", _ratio(r["val_ppl"], ref["val_ppl"]),
            _num(r["tokens_per_s"], ",.0f"), _num(r["fwd_ms"], ".1f"),
            "—" if pl else _num(r["bwd_ms"], ".1f"), "— ¹" if pl else _num(r["step_ms"], ".2f"),
            _num(r["bwd_step_ms"], ".1f"), _num(r.get("wall_s"), ".0f"),
            _num(r.get("svds"), ".0f")])
    wgs = lambda r: r["weights_b"] + r["grads_b"] + r["state_b"]
    memory = [[name(r), _mib(r["weights_b"]), _mib(r["grads_b"]), _mib(r["state_b"]),
               _mib(r["act_other_b"]), _mib(r["peak_above_b"]), _mib(r["peak_b"]),
               _ratio(r["state_b"], ref["state_b"]), _ratio(wgs(r), wgs(ref)),
               _ratio(r["peak_above_b"], ref["peak_above_b"]), _mib(r.get("estimate_b")),
               _mib(r.get("peak_model_b")), _ratio(r["peak_above_b"], r.get("peak_model_b"))]
              for r in ok]
    return C.md_table(
        ["method", "lr", "clipping", "val loss", "val ppl", f"ppl vs {rname}", "tokens/s",
         "fwd ms", "bwd ms", "opt step ms", "bwd+step ms", "run s", "SVDs"], quality) + \
        "\n\n" + C.md_table(
        ["method", "weights MiB", "grads MiB", "opt state MiB", "activations+other MiB",
         "peak above baseline MiB", "peak MiB", f"state vs {rname}",
         f"weights+grads+state vs {rname}", f"peak above baseline vs {rname}",
         "estimate (sum) MiB", "peak model MiB", "peak above baseline / model"], memory)


NOTES = (
    "¹ per-layer mode (`opt.register_hooks(model)`): the update runs inside backward, so its "
    "backward column is backward+step; its gradient memory is the largest single "
    "parameter's gradient.\n"
    "Times are means over steps 2..N; tokens/s excludes evaluation; run s is the method's "
    "whole run. activations+other = peak above baseline − weights − grads − opt state. "
    "estimate (sum) and peak model: `benchmarks/estimate_memory.py` for this model, method, "
    "rank, batch and dtype (see docs/benchmarks.md).")


def seed_table(results: list[dict], args, swept: bool) -> list[str]:
    """Validation perplexity per seed (and, after a sweep, the mean of the seeds that did
    not choose the rate)."""
    seeded = [r for r in results if "val_ppl_seeds" in r]
    if not seeded:
        return []
    rest = args.seed_list[1:] if swept else []
    extra = [f"mean of seed{'s' * (len(rest) > 1)} {', '.join(map(str, rest))} (not used to "
             "choose the rate)"] if rest else []
    rows = [[r["method"], *(f"{v:.3f}" for v in r["val_ppl_seeds"]), f"{r['val_ppl']:.3f}"]
            + ([f"{statistics.fmean(r['val_ppl_seeds'][1:]):.3f}"] if rest else [])
            for r in seeded]
    return ["", "Validation perplexity per seed:", "", C.md_table(
        ["method", *(f"seed {s}" for s in args.seed_list), "mean", *extra], rows)]


def clipping_notes(results: list[dict]) -> list[str]:
    """What clipping each method got, what it covers and how often it acted."""
    ok = [r for r in results if not r.get("error")]
    if all(r.get("clipping", "none") == "none" for r in ok):
        return []
    rows = [[r["method"], _clip_cell(r),
             "—" if r.get("clipping", "none") == "none" else
             f"all {r['trained_params']} trained tensors",
             "—" if r.get("clipped_frac") is None else f"{100 * r['clipped_frac']:.0f}%",
             _num(r.get("grad_norm_mean"), ".3f")] for r in ok]
    return ["", "## Gradient clipping", "",
            "Normal stepping: `torch.nn.utils.clip_grad_norm_(model.parameters(), clip)` "
            "before `opt.step()`. Per-layer mode (¹) cannot clip the global norm: "
            "`register_hooks(model, max_grad_norm_per_param=clip)` clips each parameter's "
            "gradient on its own, a different recipe. The clip is timed with the iteration, "
            "not in the opt step column.", "",
            C.md_table(["method", "clipping", "gradients it covers", "steps clipped",
                        "mean grad norm (before clipping)"], rows)]


def sweep_notes(sweep: list[dict], results: list[dict], args) -> list[str]:
    """The learning-rate sweep: method x rate -> selection and reported loss, best marked."""
    if not sweep:
        return []
    chosen = {r["method"]: r.get("lr") for r in results}
    first, inherits = args.seed_list[0], getattr(args, "inherits", {}) or {}
    disjoint = all(r.get("select_disjoint") for r in sweep if not r.get("error"))
    lines = ["", "## Learning-rate sweep", "",
             f"Grid `--lr-sweep {args.lr_sweep}`, on seed {first} only, each rate scored by "
             f"the loss on the selection windows ({max(1, args.eval_batches * args.batch_size - 1)}"
             " validation windows halfway between the reported ones"
             + (", no byte in common with them" if disjoint else ", overlapping them here")
             + "). The lowest wins (ties: the smaller rate); the other seeds run at that rate "
             f"and the winner's seed-{first} run is reused.", ""]
    if inherits:
        lines += ["Not swept: " + ", ".join(f"{n} takes {p}'s rate" for n, p in
                                            inherits.items()) + ".", ""]
    rows = []
    for r in sweep:
        mark = "**best**" if chosen.get(r["method"]) == r["lr"] else ""
        if r.get("error"):
            rows.append([r["method"], f"{r['lr']:g}", f"failed: {r['error']}", "", "", mark])
            continue
        div = f" (diverged at {r['diverged_at']})" if r.get("diverged_at") else ""
        rows.append([r["method"], f"{r['lr']:g}", _num(r.get("select_loss"), ".4f"),
                     f"{r['val_loss']:.4f}{div}", f"{r['val_ppl']:.3f}", mark])
    return lines + [C.md_table(["method", "lr", "select loss", "val loss", "val ppl", ""], rows)]


def make_report(results: list[dict], args, argv: list[str], wall_s: float,
                sweep: list[dict] | None = None) -> str:
    cfg = C.get_config(args.config, vocab_size=args.vocab_size)
    ok = [r for r in results if not r.get("error")]
    first = ok[0] if ok else {}
    seeds = args.seed_list
    date = f"{datetime.datetime.now().isoformat(timespec='seconds')}; total wall time " \
           f"{wall_s:.0f} s"
    if getattr(args, "resumed", None):
        date += (f" ({len(args.resumed)} runs, {args.resumed_s:.0f} s, taken from the run cut "
                 "short that `--resume` names: "
                 + ", ".join(f"{n} seed {sd} lr {lr:g}" for n, sd, lr in args.resumed) + ")")
    if getattr(args, "rendered_from", None):
        date += (f" (this report written again from `{args.rendered_from}` with "
                 "`--report-from`: the date and git revision are the report's)")
    memory = f"{first.get('memory_kind', '?')}" + (
        " measured in one process (--in-process): indicative only" if args.in_process
        else ", each method in its own process")
    if first.get("baseline_b"):
        memory += (f"; baseline (in use before the model was built) {_mib(first['baseline_b'])}"
                   f" MiB for {first['method']}")
    if first.get("malloc_mmap_threshold"):
        memory += (f"; glibc MALLOC_MMAP_THRESHOLD_={first['malloc_mmap_threshold']} (tensors "
                   "freed go back to the system, so peak RSS follows live memory)")
    meta = {
        "command": f"`{C.command_line('shootout.py', argv)}`",
        "date": date,
        "versions": C.versions(),
        "device": f"{first.get('device_name', args.device)}; parameters {args.dtype}",
        "corpus": f"{first.get('corpus', '?')} (byte tokens)",
        "model": f"`{args.config}` dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
                 f"mlp {cfg.mlp_hidden}, vocab {cfg.vocab_size}"
                 + (f", {first['params'] / 1e6:.3f}M parameters" if ok else ""),
        "budget": f"{args.steps} steps x {args.batch_size} x {args.seq_len} = "
                  f"{args.steps * args.batch_size * args.seq_len:,} tokens per method and seed, "
                  + (f"seed {seeds[0]}" if len(seeds) == 1 else
                     f"seeds {', '.join(map(str, seeds))} (quality and time: mean over seeds, "
                     "± the standard deviation across seeds; memory: the largest peak)")
                  + f"; linear warmup {args.warmup} steps then cosine to {MIN_LR_RATIO:g} x lr;"
                  f" weight decay {args.weight_decay:g}; "
                  + (f"gradient clipping at norm {args.clip:g} (global; per parameter in "
                     "per-layer mode: see Gradient clipping)" if args.clip else
                     "no grad clipping"),
        "learning rates": "the best of `--lr-sweep` per method (see Learning-rate sweep)"
                          if sweep else "each method's default (`benchmarks/common.py` METHODS)"
                          + (f", overridden by `--lr {args.lr}`" if args.lr else ""),
        "GaLore": f"rank {args.rank}, update_proj_gap {args.update_proj_gap}, scale "
                  f"{args.scale:g}, on attention and MLP matrices (`param_groups(target_modules="
                  "('attn', 'mlp'))`); embeddings, head and norms plain AdamW",
        "validation": f"{args.eval_batches} fixed batches ({args.eval_batches * args.batch_size}"
                      f" windows of {args.seq_len} bytes); loss in nats per byte, "
                      "ppl = exp(loss)",
        "memory": memory,
    }
    body = [make_table(results), "", NOTES, *seed_table(results, args, bool(sweep)),
            *clipping_notes(results), *sweep_notes(sweep or [], results, args)]
    if targets := target_table(results):
        body += ["", "## Targets (issue #7)", "", "Perplexities and tokens/s are the means over "
                 "the seeds above; the peak is above each process's baseline.", "", targets]
    return C.write_report(None, "Optimizer shoot-out", meta, "\n".join(body))


def _bars(ax, ok, parts, ylabel, title, labels):
    """Stacked bars, one per method: ``parts`` is [(label, values)]; ``labels`` on top."""
    names, bottom = [r["method"] for r in ok], [0.0] * len(ok)
    for label, vals in parts:
        vals = [max(0.0, v or 0) for v in vals]
        ax.bar(names, vals, bottom=bottom, label=label, edgecolor="white", width=0.65)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, text in enumerate(labels):
        ax.text(i, bottom[i], text, ha="center", va="bottom", fontsize=9)
    ax.set(ylabel=ylabel, title=title, ylim=(0, max(bottom) * 1.15 or 1))
    ax.tick_params(axis="x", labelrotation=12)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def make_plot(results: list[dict], args, path: Path) -> bool:
    """Validation-loss curves, time per step, exact bytes and peak memory above baseline."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    ok = [r for r in results if not r.get("error")]
    if not ok:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(16, 11))
    ax, tokens = axes[0, 0], args.batch_size * args.seq_len / 1e6
    for r in ok:
        steps, losses = zip(*r["curve"])
        ax.plot([s * tokens for s in steps], losses, marker="o", ms=3, lw=1.6,
                label=f"{r['method']}  (final {r['val_loss']:.3f}, ppl {r['val_ppl']:.2f})")
    late = [v for r in ok for _, v in r["curve"][2:] if math.isfinite(v)]
    if late and max(late) > min(late):
        ax.set_ylim(min(late) - 0.05 * (max(late) - min(late)), max(late))
    ax.set(xlabel="training tokens (M)", ylabel="validation loss (nats/byte)",
           title="Validation loss (same data, same token budget)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    apart = lambda k: [None if r["per_layer"] else r[k] for r in ok]   # per-layer: fused
    _bars(axes[0, 1], ok, [("forward", [r["fwd_ms"] for r in ok]), ("backward", apart("bwd_ms")),
                           ("optimizer step", apart("step_ms")),
                           ("backward + step (per-layer)",
                            [r["bwd_step_ms"] if r["per_layer"] else 0 for r in ok])],
          "ms per training step (mean)", "Time per step",
          [f"{r['tokens_per_s']:,.0f} tok/s" if r["tokens_per_s"] else "" for r in ok])
    mib = lambda k: [(r[k] or 0) / 2 ** 20 for r in ok]
    parts = [("weights", mib("weights_b")), ("gradients", mib("grads_b")),
             ("optimizer state", mib("state_b"))]
    exact = [sum(v) for v in zip(*(p[1] for p in parts))]
    ref = next((i for i, r in enumerate(ok) if r["method"] == "adamw"), 0)
    _bars(axes[1, 0], ok, parts, "MiB", "Weights + gradients + optimizer state (exact bytes; "
          f"× vs {ok[ref]['method']})", [f"{e:.2f} ({e / exact[ref]:.2f}×)" for e in exact])
    where = "GPU max allocated" if args.device.startswith("cuda") else "peak RSS"
    _bars(axes[1, 1], ok, parts + [("activations + other", mib("act_other_b"))], "MiB",
          f"Peak memory: {where} above baseline",
          [f"{v:.1f}" for v in mib("peak_above_b")])
    cfg = C.get_config(args.config)
    fig.suptitle(f"{args.config} (dim {cfg.dim}, {cfg.n_layers} layers, "
                 f"{ok[0]['params'] / 1e6:.2f}M params), {args.steps} steps x {args.batch_size}"
                 f" x {args.seq_len} bytes, {args.device}", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# Driver: sweep, seeds, --resume, --report-from
# ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Run the shoot-out; returns ``{"results", "runs", "sweep", "table", "out", "files",
    "wall_s", "args"}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args._worker:
            raise SystemExit(_worker(args._worker))
        if args.report_from:
            return _report_from(Path(args.report_from), args.out, args.no_plot)
        return _main(resolve(args), argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: list[str]) -> dict:
    out = Path(args.out) if args.out else ROOT / "runs" / (
        "shootout-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"shoot-out: {', '.join(args.method_list)} on {args.config}, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len}, device {args.device} -> {out}", file=sys.stderr)
    corpus = C.load_corpus(args.data) if args.in_process else None
    args.select_eval = bool(args.sweep_grid)
    sweep, runs, pool = [], [], load_resume(args.resume, argv) if args.resume else []
    args.resumed, args.resumed_s = [], 0.0   # (method, seed, lr) taken from --resume

    with tempfile.TemporaryDirectory() as tmp:
        def run(name, seed, lr, into):
            same = lambda r: (r["method"], r["seed"], r["lr"]) == (name, seed, lr)
            if into is runs and (won := next(filter(same, sweep), None)):  # the sweep's run
                into.append(dict(won))
                return won
            if old := next((r for r in pool if same(r) and not r.get("error")), None):
                into.append(dict(old))
                args.resumed.append((name, seed, lr))
                args.resumed_s += old.get("wall_s") or 0.0
                return old
            run_args = argparse.Namespace(**{**vars(args), "seed": seed,
                                             "lrs": {**args.lrs, name: lr}})
            t = time.perf_counter()
            if args.in_process:
                r = _run_guarded(name, run_args, corpus)
                gc.collect()
            else:
                r = _run_subprocess(name, run_args, Path(tmp))
            r.update(seed=seed, lr=lr, wall_s=time.perf_counter() - t)
            into.append(r)
            (out / "partial.json").write_text(json.dumps(dict(  # should the run be cut short
                argv=argv, sweep=sweep, runs=runs, lrs=args.lrs), indent=1))
            return r

        first = args.seed_list[0]
        for name, rates in args.sweep_grid.items():
            for lr in rates:
                r = run(name, first, lr, sweep)
                print(f"sweep {name} lr {lr:g}: select loss {r.get('select_loss')}",
                      file=sys.stderr, flush=True)
            args.lrs[name] = best_rate(sweep, name)
        for name, parent in args.inherits.items():
            args.lrs[name] = args.lrs[parent]
        if args.sweep_grid:
            print("chosen rates: " + ", ".join(f"{n} {v:g}" for n, v in args.lrs.items()),
                  file=sys.stderr, flush=True)
        # a sweep runs seed by seed, so that a run cut short leaves whole seeds
        order = [(n, s) for s in args.seed_list for n in args.method_list] if args.sweep_grid \
            else [(n, s) for n in args.method_list for s in args.seed_list]
        for name, seed in order:
            run(name, seed, args.lrs[name], runs)
    runs.sort(key=lambda r: (args.method_list.index(r["method"]),
                             args.seed_list.index(r["seed"])))
    written = _write(runs, args, argv, time.perf_counter() - t0 + args.resumed_s, out, sweep)
    (out / "partial.json").unlink(missing_ok=True)  # only now: a failed report keeps the runs
    return written


# what two runs must share for one to reuse the other's measurements (--resume)
_SAME = ("config", "vocab_size", "steps", "batch_size", "seq_len", "lr", "clip", "warmup",
         "weight_decay", "rank", "update_proj_gap", "scale", "eval_every", "eval_batches",
         "device", "dtype", "threads", "data", "in_process", "malloc_default")


def load_resume(path: str, argv: list[str]) -> list[dict]:
    """The completed runs (sweep and seeds) of ``path`` (a ``partial.json``), after
    checking that its arguments agree with ``argv``'s on everything that shapes a run."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume {path}: {e}")
    mine, theirs = resolve(parse_args(argv)), resolve(parse_args(saved["argv"]))
    differ = [k for k in _SAME if getattr(mine, k) != getattr(theirs, k)]
    # runs are matched by method, seed and rate, whatever grid they came from; only a sweep
    # scores runs on the selection windows
    if bool(mine.sweep_grid) != bool(theirs.sweep_grid):
        differ.append("--lr-sweep (one run sweeps, the other does not)")
    if differ:
        raise SystemExit(f"--resume {path}: that run differs in {', '.join(differ)}")
    return saved.get("sweep", []) + saved.get("runs", [])


def best_rate(sweep: list[dict], name: str) -> float:
    """The rate of ``name``'s sweep run with the lowest selection loss (a failed or diverged
    run never wins; ties: the smaller rate)."""
    def key(r):
        v = None if r.get("error") or r.get("diverged_at") else r.get("select_loss")
        return (v if v is not None and math.isfinite(v) else math.inf), r["lr"]
    return min((r for r in sweep if r["method"] == name), key=key)["lr"]


def _report_from(path: Path, out: str | None, no_plot: bool) -> dict:
    saved = json.loads(path.read_text())
    args = argparse.Namespace(**saved["args"])
    args.no_plot, args.rendered_from = no_plot, str(path)
    out = Path(out) if out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    return _write(saved["runs"], args, saved["argv"], saved["wall_s"], out, saved.get("sweep"))


def _write(runs: list[dict], args: argparse.Namespace, argv: list[str], wall: float,
           out: Path, sweep: list[dict] | None = None) -> dict:
    """Aggregate the runs over seeds, then write results.md, results.json and the plot."""
    results, sweep = aggregate(runs), sweep or []
    add_estimates(results, args)
    report = make_report(results, args, argv, wall, sweep)
    files = {"table": out / "results.md", "json": out / "results.json"}
    files["table"].write_text(report)
    files["json"].write_text(json.dumps(dict(argv=argv, args=vars(args), wall_s=wall,
                                             results=results, runs=runs, sweep=sweep), indent=1))
    if not args.no_plot and make_plot(results, args, out / "shootout.png"):
        files["plot"] = out / "shootout.png"
    print("\n" + report)
    for k, v in files.items():
        print(f"{k}: {v}")
    return dict(results=results, runs=runs, table=report, out=out, files=files, wall_s=wall,
                args=args, sweep=sweep)


if __name__ == "__main__":
    main()
