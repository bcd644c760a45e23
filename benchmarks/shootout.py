"""The main job: train one small LLaMA-style model with each optimizer and compare them.

    python benchmarks/shootout.py                      # all available methods, ~10 min on 2 CPU cores
    python benchmarks/shootout.py --methods adamw,galore --steps 200
    python benchmarks/shootout.py --config small --device cuda --steps 2000
    python benchmarks/shootout.py --data ~/my_text_folder --config llama_60m --vocab-size 256
    python benchmarks/shootout.py --lr-sweep 0.5,1,2 --seeds 0,1,2   # tuned rates, 3 seeds
    python benchmarks/shootout.py --methods galore+state_on_refresh=keep,galore+state_on_refresh=project

A method is a name of ``common.METHODS``, optionally with optimizer keywords appended as
``+key=value`` (``qgalore+gamma_proj=1``: Q-GaLore without the lazy refresh; ``loqt+
update_proj_gap=50+state_on_merge=project``): each such variant is its own row. The
``SVDs`` column counts the basis refreshes (``state["refresh_count"]``) of the first seed's
run, so lazy and fixed refresh compare directly.

Every method trains the same model (same seed, same initial weights), on the same data in
the same order, for the same token budget (``--steps`` x ``--batch-size`` x ``--seq-len``),
with linear warmup and cosine decay to 10% of its peak learning rate (``LambdaLR``, which
also drives the per-layer mode since that is one optimizer), and the standard recipe's
gradient clipping: ``clip_grad_norm_(model.parameters(), --clip)`` (default 1.0) before
``opt.step()``; per-layer methods, which cannot clip the global norm, clip each parameter's
gradient to ``--clip`` (``register_hooks(model, max_grad_norm_per_param=...)``). The
report names the clipping each method got and the gradients it covers (all of them:
Q-GaLore's INT8 weights have an ordinary ``.grad`` too). The corpus is the
Python standard library's own source (byte tokens, see ``common.load_corpus``).

``--lr-sweep 0.5,1,2`` tunes the rates first: every method runs on the first seed at each
rate of its grid (multiples of its default, or ``METHOD=LR:LR:...``), the rate with the
lowest loss on the *selection windows* (validation windows between the reported ones, no
byte in common) is kept, and the other seeds run at that rate; 8-bit and per-layer
variants take their parent's rate (``--sweep-variants`` sweeps them too). The results
file holds the sweep table.

Each method runs in its own subprocess so that peak memories do not mix
(``--in-process`` runs them one after another in this process: faster, but the memory
columns are then only indicative). Measured per method:

* validation loss (mean cross-entropy in nats per byte) and perplexity ``exp(loss)`` on
  fixed validation windows, every ``--eval-every`` steps and at the end;
* tokens/s and the mean time of forward, backward and optimizer step (device-synchronised,
  the first step excluded as warm-up). In per-layer mode the update happens inside
  backward, so only backward+step together is reported;
* exact bytes of weights, gradients (what normal stepping holds: every trainable
  parameter's; per-layer mode: the largest parameter's) and optimizer state (every tensor
  in ``optimizer.state``), and peak memory: peak RSS (VmHWM) on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA. "above baseline" subtracts the memory in use
  before the model was built (Python, torch, the corpus); activations+other is that peak
  minus weights, gradients and state. On CPU the workers run with glibc's
  ``MALLOC_MMAP_THRESHOLD_=131072`` (``--malloc-default`` to keep the dynamic threshold):
  otherwise freed temporaries of up to 32 MB stay in the heap and peak RSS measures
  fragmentation (LLaMA-60M, 6 steps: Q-GaLore per-layer 978 vs 620 MiB above baseline;
  a 4 MiB threshold still put the peaks 16-29% above the peak model). The price is speed:
  each larger tensor is mapped and unmapped, ~1.7x slower steps on the tiny default.
  ``estimate_memory.py``'s sum (weights + gradients + state + saved activations) and its
  peak model for the same run are printed beside each peak.

Output: a Markdown table (``results.md``, also printed), ``results.json`` and a figure
(``shootout.png``: validation-loss curves, memory bars, time per step) under ``--out``
(default ``runs/shootout-<timestamp>/``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shlex
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _paths import HERE, ROOT

import torch

import common as C

# Defaults: "tiny" (0.86M parameters) for 500 steps of 16 x 128 bytes (1.02M tokens per
# method): ~330 ms per step on 2 idle CPU cores with the workers' small mmap threshold
# (~190 ms with glibc's default, which measures heap fragmentation instead of live memory),
# about 3.3 minutes per method and 17 for the five default methods; `make bench` passes
# --steps 300 to stay near 10 minutes.
DEFAULTS = dict(config="tiny", steps=500, batch_size=16, eval_every=50, eval_batches=8,
                update_proj_gap=200, scale=0.25, seed=0)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None/False: the help text says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shootout.py", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--methods", default=None,
                   help=f"comma list from {', '.join(C.METHODS)}, each optionally with "
                        "optimizer keywords: NAME+key=value+... (default: "
                        f"{', '.join(n for n, m in C.METHODS.items() if m.default)}, those "
                        "whose packages are installed)")
    p.add_argument("--config", default=DEFAULTS["config"],
                   help=f"model size: {', '.join(C.CONFIGS)}")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="embedding/head rows (>= 256; tokens are bytes)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per method")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's")
    p.add_argument("--lr", default=None,
                   help="peak lr for every method (e.g. 3e-3), or per method "
                        "(e.g. adamw=3e-3,galore=1e-2); default: each method's own")
    p.add_argument("--lr-sweep", default=None, metavar="GRID",
                   help="tune the rates first: each method runs on the first seed at every rate "
                        "of its grid, the best by validation loss on the selection windows "
                        "(other validation windows than the reported ones) is kept, and the "
                        "other seeds run at that rate. GRID: multipliers of each method's rate "
                        "(e.g. 0.5,1,2), and/or explicit rates per method (e.g. "
                        "adamw=7.5e-4:1.5e-3:3e-3); a method with neither runs at its rate only. "
                        "Variants (8-bit, per-layer, other storage) whose parent method is also "
                        "run take the parent's best rate, unless --sweep-variants")
    p.add_argument("--sweep-variants", action="store_true",
                   help="with --lr-sweep: sweep the variants too instead of inheriting")
    p.add_argument("--clip", type=float, default=1.0,
                   help="gradient-norm clipping: torch.nn.utils.clip_grad_norm_(model."
                        "parameters(), CLIP) before opt.step(); per-layer methods clip each "
                        "parameter's gradient to CLIP instead (register_hooks(model, "
                        "max_grad_norm_per_param=CLIP)); 0 disables")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final lr / peak lr of the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled")
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default: dim // 4)")
    p.add_argument("--update-proj-gap", type=int, default=DEFAULTS["update_proj_gap"],
                   help="GaLore: steps between SVDs")
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"], help="GaLore scale")
    p.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"],
                   help="validation every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=DEFAULTS["eval_batches"],
                   help="fixed validation batches of --batch-size x --seq-len")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="model init and data order")
    p.add_argument("--seeds", default=None,
                   help="comma list of seeds (e.g. 0,1,2): every method runs once per seed and "
                        "the table gives the mean over seeds (default: --seed only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter dtype (bfloat16: pure-bf16 training, as the GaLore "
                        "reference; the loss is computed in float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; use 1 when other jobs "
                        "share the CPU cores: oversubscribed OpenMP threads are very slow)")
    p.add_argument("--data", default=None,
                   help="text file or folder (default: the Python stdlib's .py files)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of files (or bytes) held out")
    p.add_argument("--out", default=None, help="results folder (default runs/shootout-<time>)")
    p.add_argument("--in-process", action="store_true",
                   help="run the methods in this process (peak memory then only indicative)")
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU: keep glibc's dynamic mmap threshold in the workers (default: "
                        "MALLOC_MMAP_THRESHOLD_=131072, so freed tensors go back to the system "
                        "and peak RSS follows live memory instead of heap fragmentation)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--report-from", default=None, metavar="RESULTS_JSON",
                   help="train nothing: write the table and plot again from a results.json "
                        "of an earlier run (into --out, default that file's folder)")
    p.add_argument("--resume", default=None, metavar="PARTIAL_JSON",
                   help="reuse the runs of a run cut short (its --out folder's partial.json, "
                        "written after every run): a method, seed and rate found there is not "
                        "run again. The two runs must agree on everything but --out, --resume, "
                        "--methods and the --lr-sweep grid (a grid that adds rates runs only "
                        "those)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.eval_batches < 1:
        p.error("--steps, --batch-size, --eval-every and --eval-batches must be >= 1")
    if args.vocab_size < 256:
        p.error("--vocab-size must be >= 256 (tokens are bytes)")
    if not args.clip >= 0:
        p.error("--clip must be >= 0 (0: no clipping)")
    return args


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other arguments; check the method names."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = C.get_config(args.config, vocab_size=args.vocab_size)
    except ValueError as e:
        raise SystemExit(str(e))
    if args.seq_len is None:
        args.seq_len = cfg.seq_len
    if args.rank is None:
        args.rank = max(1, cfg.dim // 4)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.methods is None:
        args.methods = ",".join(n for n, m in C.METHODS.items() if m.default and m.available())
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not names:
        raise SystemExit(f"--methods: choose from {', '.join(C.METHODS)}")
    try:
        methods = {n: C.method(n) for n in names}
    except ValueError as e:
        raise SystemExit(f"--methods: {e}")
    missing = [f"{n} (needs {', '.join(m.requires)})" for n, m in methods.items()
               if not m.available()]
    if missing:
        raise SystemExit(f"not available here: {', '.join(missing)}")
    args.method_list = names
    try:
        args.seed_list = ([int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds
                          else [args.seed])
    except ValueError:
        raise SystemExit(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        raise SystemExit(f"--seeds: expected distinct integers, got {args.seeds!r}")
    args.lrs = {n: m.lr for n, m in methods.items()}
    if args.lr:
        for item in args.lr.split(","):
            if "=" in item:
                k, v = item.rsplit("=", 1)
                if k.strip() not in C.METHODS and k.strip() not in names:
                    raise SystemExit(f"--lr: unknown method {k!r}")
                if k.strip() in args.lrs:
                    args.lrs[k.strip()] = float(v)
            else:
                args.lrs = {n: float(item) for n in names}
    args.sweep_grid, args.inherits = parse_sweep(args.lr_sweep, names, args.lrs,
                                                 args.sweep_variants) if args.lr_sweep else ({}, {})
    return args


def parse_sweep(spec: str, names: list[str], lrs: dict, variants: bool = False
                ) -> tuple[dict, dict]:
    """``--lr-sweep`` -> (``{method: [rates]}`` for the methods swept, ``{variant:
    parent}`` for those that take their parent's best rate)."""
    mults, explicit = [], {}
    try:
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            if "=" in item:
                k, v = (x.strip() for x in item.rsplit("=", 1))
                if k not in C.METHODS and k not in names:
                    raise SystemExit(f"--lr-sweep: unknown method {k!r}")
                explicit[k] = [float(x) for x in v.split(":") if x.strip()]
            else:
                mults.append(float(item))
    except ValueError:
        raise SystemExit(f"--lr-sweep: expected multipliers (0.5,1,2) and/or METHOD=LR:LR:..., "
                         f"got {spec!r}")
    if any(not r > 0 for r in mults + sum(explicit.values(), [])):
        raise SystemExit(f"--lr-sweep: rates and multipliers must be > 0, got {spec!r}")
    inherits = {} if variants else {
        n: C.method(n).parent for n in names
        if C.method(n).parent in names and n not in explicit}
    grid = {}
    for n in names:
        if n in inherits:
            continue
        rates = explicit.get(n) or [lrs[n] * m for m in mults] or [lrs[n]]
        grid[n] = sorted(set(float(f"{r:.6g}") for r in rates))
    return grid, inherits


# ---------------------------------------------------------------------------------------
# One method's run
# ---------------------------------------------------------------------------------------

def _progress(total: int, desc: str, quiet: bool):
    """tqdm if installed, else a line every ~10%."""
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


@torch.no_grad()
def evaluate_windows(model, windows) -> float:
    """Mean loss over ``windows``' batches."""
    was_training = model.training
    model.eval()
    losses = [model(x, y).item() for x, y in windows]
    model.train(was_training)
    return sum(losses) / len(losses)


def evaluate(model, batches: C.Batches) -> float:
    """Loss on the reported validation windows."""
    return evaluate_windows(model, batches.val)


def clip_info(model, per_layer: bool, clip: float) -> dict:
    """Which clipping a run gets (``clipping``: "global", "per-parameter" or "none") and
    what it covers: every trained tensor (``trained_params``; Q-GaLore's INT8 weights have
    an ordinary ``.grad`` that ``clip_grad_norm_(model.parameters())`` counts and scales,
    so ``unclipped_params`` is 0, kept for the results' format)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    kind = "none" if not clip else "per-parameter" if per_layer else "global"
    return dict(clipping=kind, clip=clip, trained_params=len(trained),
                trained_numel=sum(p.numel() for p in trained), unclipped_params=0,
                unclipped_numel=0)


def _warm_up(method: C.Method, args: argparse.Namespace, device: torch.device) -> None:
    """Two steps of the method on a throwaway small model, before memory is measured: the
    kernels' code pages (libtorch, oneDNN, LAPACK, bitsandbytes), which count in RSS once
    touched, and CUDA's context and workspaces then sit in the baseline, not in the peak."""
    cfg = C.get_config("tiny", vocab_size=args.vocab_size, seq_len=32)
    model = C.LlamaLM(cfg).to(device=device, dtype=getattr(torch, args.dtype))
    margs = C.MethodArgs(lr=1e-4, rank=min(args.rank, cfg.dim // 4))
    prep = method.build(model, margs)
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
    """The run's model: ``args.config`` with its vocabulary, and a rotary table long enough
    for ``--seq-len``."""
    return C.get_config(args.config, vocab_size=args.vocab_size,
                        seq_len=max(args.seq_len, C.get_config(args.config).seq_len))


def run_method(name: str, args: argparse.Namespace, corpus: C.Corpus | None = None) -> dict:
    """Train ``args.config`` with method ``name``; return the measurements as a dict."""
    device = torch.device(args.device)
    corpus = corpus if corpus is not None else C.load_corpus(args.data, args.val_fraction)
    cfg = model_config(args)
    method = C.method(name)
    _warm_up(method, args, device)
    meter = C.MemoryMeter(device)
    meter.start()

    torch.manual_seed(args.seed)
    model = C.LlamaLM(cfg).to(device=device, dtype=getattr(torch, args.dtype))
    clip = getattr(args, "clip", 0.0) or 0.0
    margs = C.MethodArgs(lr=args.lrs[name], rank=args.rank, update_proj_gap=args.update_proj_gap,
                         scale=args.scale, weight_decay=args.weight_decay,
                         max_grad_norm_per_param=clip or None)
    prep = method.build(model, margs)
    model, opt = prep.model, prep.optimizer
    clipping = clip_info(model, prep.per_layer, clip)
    grad_norms = []
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, C.lr_lambda(args.warmup, args.steps, args.min_lr_ratio))
    batches = C.Batches(corpus, args.batch_size, args.seq_len, args.seed, args.eval_batches,
                        device)
    t_fwd, t_bwd, t_opt, t_all = (C.Timer(device) for _ in range(4))
    curve = [(0, evaluate(model, batches))]
    train_loss, diverged = [], None
    bar = _progress(args.steps, name, args.quiet)
    every = max(1, args.steps // 10)
    model.train()
    for step in range(args.steps):
        warm = step == 0
        with t_all:
            x, y = batches.next_train()
            with t_fwd:
                loss = model(x, y)
            with t_bwd:
                loss.backward()        # per-layer mode: parameters are updated in here
            if not prep.per_layer:
                if clip:  # timed with the iteration (tokens/s), not in the step's column
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(
                        model.parameters(), clip).item())
                with t_opt:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            sched.step()
            loss_v = loss.item()
        if warm:  # the first step (lazy state, first SVDs) is not timed
            for t in (t_fwd, t_bwd, t_opt, t_all):
                t.total, t.count = 0.0, 0
        train_loss.append(loss_v)
        if not math.isfinite(loss_v):
            diverged = step + 1
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps or diverged:
            curve.append((step + 1, evaluate(model, batches)))
            if bar is not None:
                bar.set_postfix(train=f"{loss_v:.3f}", val=f"{curve[-1][1]:.3f}")
        if bar is not None:
            bar.update(1)
        elif not args.quiet and ((step + 1) % every == 0 or step + 1 == args.steps):
            print(f"  {name}: step {step + 1}/{args.steps}  train {loss_v:.4f}  "
                  f"val {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
        if diverged:
            break
    if bar is not None:
        bar.close()

    select = evaluate_windows(model, batches.select) if getattr(args, "select_eval", False) \
        else None
    timed = max(1, t_all.count)
    ms = lambda t: 1000 * t.total / max(1, t.count) if t.count else None
    peak = meter.peak()
    weights = C.weight_bytes(model)
    grads = C.grad_bytes(model, per_layer=prep.per_layer)
    state = C.state_bytes(opt)
    above = None if peak is None else peak - meter.baseline
    result = dict(
        method=name, description=method.description, lr=args.lrs[name],
        per_layer=prep.per_layer, params=C.count_params(model),
        val_loss=curve[-1][1], val_ppl=math.exp(min(curve[-1][1], 700)), curve=curve,
        train_loss=train_loss, diverged_at=diverged,
        tokens_per_s=args.batch_size * args.seq_len * t_all.count / t_all.total
        if t_all.count else None,
        fwd_ms=ms(t_fwd), bwd_ms=ms(t_bwd), step_ms=None if prep.per_layer else ms(t_opt),
        bwd_step_ms=(ms(t_bwd) or 0) + (0 if prep.per_layer else ms(t_opt) or 0),
        iter_ms=1000 * t_all.total / timed,
        weights_b=weights, grads_b=grads, state_b=state, peak_b=peak,
        baseline_b=meter.baseline, peak_above_b=above,
        act_other_b=None if above is None else above - weights - grads - state,
        memory_kind=meter.kind, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        select_loss=select, select_disjoint=batches.select_disjoint, **clipping,
        svds=sum(int(st.get("refresh_count", 0)) for st in opt.state.values()),
        grad_norm_mean=statistics.fmean(grad_norms) if grad_norms else None,
        clipped_frac=(sum(g > clip for g in grad_norms) / len(grad_norms)
                      if grad_norms else None),
        corpus=corpus.describe(), device_name=C.device_name(args.device),
        error=None)
    if prep.hooks is not None:
        prep.hooks.remove()
    return result


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    args = parse_args([])            # defaults, then the parent's resolved arguments
    vars(args).update(spec["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_method(spec["method"], args)
    except Exception as e:  # reported in the table; the traceback goes to stderr
        import traceback
        traceback.print_exc()
        result = dict(method=spec["method"], error=f"{type(e).__name__}: {e}")
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _run_subprocess(name: str, args: argparse.Namespace, tmp: Path) -> dict:
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
# Seeds
# ---------------------------------------------------------------------------------------

# averaged over seeds; the byte counts are the same for every seed, the peak is the largest
_MEAN_KEYS = ("val_loss", "val_ppl", "tokens_per_s", "fwd_ms", "bwd_ms", "step_ms",
              "bwd_step_ms", "iter_ms", "wall_s", "grad_norm_mean", "clipped_frac", "svds")


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per method from its runs (one per seed): the mean of the quality and time
    measurements, the largest peak memory, the mean validation curve, and the per-seed
    perplexities (``val_ppl_seeds``, ``val_ppl_std``). A method with one run is unchanged;
    a method with a failed seed is reported as failed."""
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == name]
        bad = next((r for r in rs if r.get("error")), None)
        if len(rs) == 1:
            rows.append(rs[0])
            continue
        if bad:
            rows.append(dict(method=name, seeds=[r["seed"] for r in rs],
                             error=f"seed {bad['seed']}: {bad['error']}"))
            continue
        row = dict(rs[0], seeds=[r["seed"] for r in rs],
                   val_ppl_seeds=[r["val_ppl"] for r in rs],
                   val_ppl_std=statistics.stdev(r["val_ppl"] for r in rs),
                   diverged_at=next((r["diverged_at"] for r in rs if r["diverged_at"]), None))
        for k in _MEAN_KEYS:
            vals = [r.get(k) for r in rs]
            row[k] = None if None in vals else statistics.fmean(vals)
        peaks = [r["peak_b"] for r in rs]
        if None not in peaks:
            worst = rs[peaks.index(max(peaks))]
            row.update(peak_b=worst["peak_b"], baseline_b=worst["baseline_b"],
                       peak_above_b=worst["peak_above_b"], act_other_b=worst["act_other_b"])
        curves = [r["curve"] for r in rs]
        if all([s for s, _ in c] == [s for s, _ in curves[0]] for c in curves):
            row["curve"] = [(s, statistics.fmean(c[i][1] for c in curves))
                            for i, (s, _) in enumerate(curves[0])]
        rows.append(row)
    return rows


def add_estimates(results: list[dict], args: argparse.Namespace) -> None:
    """Set ``estimate_b`` and ``peak_model_b`` of each result from ``estimate_memory.py``
    for this run's model, method, rank, batch, dtype and device: the sum of weights,
    gradients, optimizer state and bytes saved for backward (the papers' convention), and
    its model of the step's peak (``peak_model``: the largest of the loss, backward and
    step phases, with the temporaries of each); None for a method it does not model."""
    import estimate_memory as E
    cfg = model_config(args)
    dt = getattr(torch, args.dtype)
    dev = "cpu" if args.device == "cpu" else "cuda"
    acts = None
    for r in results:
        r["estimate_b"] = r["peak_model_b"] = None
        if r.get("error") or r["method"] not in E.METHODS:
            continue
        if acts is None:
            acts = E.activation_bytes(cfg, args.batch_size, args.seq_len, dt, False)
        r["estimate_b"] = sum(E.estimate(r["method"], cfg, args.rank, dt, acts).values())
        r["peak_model_b"] = E.peak_model(r["method"], cfg, args.rank, dt, args.batch_size,
                                         args.seq_len, device=dev)["peak"]


# the targets for the main job (#7): (description, check(results by method) ->
# (measured text, met: True/False, or None when this run cannot decide) or None when a
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
    ref = by["adamw"]["peak_above_b"]
    q = {n: by[n]["peak_above_b"] / ref for n in low}
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
    if not q:
        return None
    return ", ".join(f"{n} {v:.2f}×" for n, v in q.items()), all(
        abs(v - 1) <= 0.1 for v in q.values())


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
    rows = [(what, got) for what, check in TARGETS if (got := check(by)) is not None]
    if not rows:
        return ""
    return "\n".join(["| target | measured | met |", "|---|---|---|"] + [
        f"| {what} | {text} | {'–' if ok is None else 'yes' if ok else '**no**'} |"
        for what, (text, ok) in rows])


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
    if kind == "none":
        return "none"
    text = f"{'per-param' if kind == 'per-parameter' else kind} {r['clip']:g}"
    return text + (" ²" if r.get("unclipped_params") else "")


def clipping_notes(results: list[dict]) -> list[str]:
    """The report's lines on gradient clipping: what each method got and, for the global
    clip, what it did not cover and how often it acted."""
    ok = [r for r in results if not r.get("error")]
    if not ok or all(r.get("clipping", "none") == "none" for r in ok):
        return []
    lines = ["", "## Gradient clipping", "",
             "Normal stepping: `torch.nn.utils.clip_grad_norm_(model.parameters(), clip)` after "
             "backward, before `opt.step()` (global norm over all gradients). Per-layer mode "
             "(¹) cannot clip the global norm (each parameter is updated before the next "
             "gradient exists): `register_hooks(model, max_grad_norm_per_param=clip)` clips "
             "each parameter's gradient to that norm on its own, a different recipe, so its "
             "quality is not the normal-stepping method's. The clip is timed with the "
             "iteration (tokens/s), not in the opt step column.", "",
             "| method | clipping | gradients it covers | steps clipped | mean grad norm "
             "(before clipping) |", "|---|---|---|---|---|"]
    for r in ok:
        kind = r.get("clipping", "none")
        if kind == "none":
            cover = "—"
        elif r.get("unclipped_params"):  # runs from before INT8 weights had a .grad
            cover = (f"**not all**: {r['unclipped_params']} of {r['trained_params']} trained "
                     f"tensors ({r['unclipped_numel']:,} of {r['trained_numel']:,} elements) "
                     "are INT8 weights whose gradient was outside `.grad`: neither in the "
                     "norm nor clipped")
        else:
            cover = f"all {r['trained_params']} trained tensors"
        frac = "—" if r.get("clipped_frac") is None else f"{100 * r['clipped_frac']:.0f}%"
        norm = "—" if r.get("grad_norm_mean") is None else f"{r['grad_norm_mean']:.3f}"
        lines.append(f"| {r['method']} | {_clip_cell(r)} | {cover} | {frac} | {norm} |")
    if any(r.get("unclipped_params") for r in ok):
        names = ", ".join(r["method"] for r in ok if r.get("unclipped_params"))
        lines += ["", f"² {names}: the global clip does not cover every weight (see the table)."
                  " Its INT8 weights are updated with unclipped gradients; only the float "
                  "parameters (embeddings, norms, head) are clipped, by their own norm."]
    return lines


def sweep_notes(sweep: list[dict], results: list[dict], args) -> list[str]:
    """The learning-rate sweep: method x rate -> selection and reported validation loss,
    the chosen rate marked."""
    if not sweep:
        return []
    chosen = {r["method"]: r.get("lr") for r in results}
    first = args.seed_list[0]
    inherits = getattr(args, "inherits", {}) or {}
    disjoint = all(r.get("select_disjoint") for r in sweep if not r.get("error"))
    lines = ["", "## Learning-rate sweep", "",
             f"Grid `--lr-sweep {args.lr_sweep}`, on seed {first} only. Each rate is scored "
             "by the validation loss on the **selection windows**: "
             f"{max(1, args.eval_batches * args.batch_size - 1)} window(s) of the validation "
             "split, each halfway between two of the reported windows"
             + (" (no byte in common with them)" if disjoint else
                " (they overlap the reported windows here: too little validation text)")
             + ". The lowest wins (a failed or diverged run never does; ties go to the smaller "
             "rate); the other seeds then run at that rate, and the run of the winner on seed "
             f"{first} is reused as that seed's. Selection bias: the rate is chosen on other "
             "windows than the ones reported, and on one seed while the table reports the "
             "mean of all; the seeds after the first never took part in the choice, so their "
             "mean (in the per-seed table) is free of it.", ""]
    if inherits:
        lines += ["Not swept, to save time: "
                  + ", ".join(f"{n} takes {p}'s rate" for n, p in inherits.items())
                  + " (same update rule: 8-bit moments or per-layer stepping of the parent's "
                  "method; per-layer mode clips per parameter, so its best rate may differ).", ""]
    lines += ["| method | lr | select loss | val loss | val ppl | |", "|---|---|---|---|---|---|"]
    for r in sweep:
        mark = "**best**" if chosen.get(r["method"]) == r["lr"] else ""
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['lr']:g} | failed: {r['error']} | | | {mark} |")
            continue
        div = f" (diverged at {r['diverged_at']})" if r.get("diverged_at") else ""
        sel = "—" if r.get("select_loss") is None else f"{r['select_loss']:.4f}"
        lines.append(f"| {r['method']} | {r['lr']:g} | {sel} | {r['val_loss']:.4f}{div} | "
                     f"{r['val_ppl']:.3f} | {mark} |")
    return lines


def make_table(results: list[dict]) -> str:
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


def make_report(results: list[dict], args, argv: list[str], wall_s: float,
                sweep: list[dict] | None = None) -> str:
    cfg = C.get_config(args.config, vocab_size=args.vocab_size)
    ok = [r for r in results if not r.get("error")]
    params = ok[0]["params"] if ok else None
    corpus = ok[0]["corpus"] if ok else "?"
    mem_kind = ok[0]["memory_kind"] if ok else "?"
    baseline = ok[0]["baseline_b"] if ok else None
    tokens = args.steps * args.batch_size * args.seq_len
    lines = [
        "# Optimizer shoot-out", "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/shootout.py'] + argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; total wall time "
        f"{wall_s:.0f} s"
        + (f" ({len(args.resumed)} runs, {args.resumed_s:.0f} s, taken from the run cut short"
           f" that `--resume` names: "
           + ", ".join(f"{n} seed {sd} lr {lr:g}" for n, sd, lr in args.resumed) + ")"
           if getattr(args, "resumed", None) else "")
        + (f" (this report written again from `{args.rendered_from}` with `--report-from`: "
           "the date and git revision are the report's, the measurements the run's)"
           if getattr(args, "rendered_from", None) else ""),
        f"- versions: {C.versions()}",
        f"- device: {ok[0]['device_name'] if ok else args.device}; parameters {args.dtype}",
        f"- corpus: {corpus} (byte tokens)",
        f"- model: `{args.config}` dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"mlp {cfg.mlp_hidden}, vocab {cfg.vocab_size}"
        + (f", {params / 1e6:.3f}M parameters" if params else ""),
        f"- budget: {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} "
        f"tokens per method and seed, "
        + (f"seed {args.seed_list[0]}" if len(args.seed_list) == 1 else
           f"seeds {', '.join(map(str, args.seed_list))} (quality and time: mean over seeds, "
           "± the standard deviation across seeds; memory: the largest peak)")
        + f"; linear warmup {args.warmup} steps then cosine "
        f"to {args.min_lr_ratio:g} x lr; weight decay {args.weight_decay:g}; "
        + (f"gradient clipping at norm {args.clip:g} (global; per parameter in per-layer mode:"
           " see Gradient clipping)" if getattr(args, "clip", 0) else "no grad clipping"),
        "- learning rates: "
        + ("the best of `--lr-sweep` per method (see Learning-rate sweep)" if sweep else
           "each method's default (`benchmarks/common.py` METHODS)"
           + (f", overridden by `--lr {args.lr}`" if getattr(args, "lr", None) else "")),
        f"- GaLore: rank {args.rank}, update_proj_gap {args.update_proj_gap}, scale "
        f"{args.scale:g}, on attention and MLP matrices (`param_groups(target_modules="
        f"('attn', 'mlp'))`); embeddings, head and norms plain AdamW",
        f"- validation: {args.eval_batches} fixed batches ({args.eval_batches * args.batch_size}"
        f" windows of {args.seq_len} bytes); loss in nats per byte, ppl = exp(loss)",
        f"- memory: {mem_kind}"
        + (" measured in one process (--in-process): indicative only" if args.in_process
           else ", each method in its own process")
        + (f"; baseline (in use before the model was built) {_mib(baseline)} MiB for "
           f"{ok[0]['method']}" if baseline else "")
        + (f"; glibc MALLOC_MMAP_THRESHOLD_={ok[0]['malloc_mmap_threshold']} (tensors freed "
           "go back to the system, so peak RSS follows live memory)"
           if ok and ok[0].get("malloc_mmap_threshold") else ""),
        "", make_table(results), "",
        "¹ per-layer mode (`opt.register_hooks(model)`): the update runs inside backward, so "
        "its backward column is backward+step and there is no separate step; its gradient "
        "memory is the largest single parameter's gradient.",
        "Times are means over steps 2..N (step 1, with lazy state and the first SVDs, is "
        "excluded); tokens/s excludes evaluation; run s is the method's whole run (process "
        "start, warm-up, evaluations included). activations+other = peak above baseline − "
        "weights − grads − opt state (allocator caches included). estimate (sum): "
        "`benchmarks/estimate_memory.py`'s count for this model, method, rank, batch and "
        "dtype (weights + grads + optimizer state + the bytes autograd saves for backward, "
        "as the papers count); peak model: its `peak_model`, weights + state + the largest "
        "of the loss, backward and step phases with their temporaries (no runtime or "
        "allocator slack).",
    ]
    seeded = [r for r in results if "val_ppl_seeds" in r]
    if seeded:
        rest = args.seed_list[1:] if sweep else []
        lines += ["", "Validation perplexity per seed:", "",
                  "| method | " + " | ".join(f"seed {s}" for s in args.seed_list) + " | mean |"
                  + (f" mean of seed{'s' * (len(rest) > 1)} {', '.join(map(str, rest))} "
                     "(not used to choose the rate) |" if rest else ""),
                  "|---|" + "---|" * (len(args.seed_list) + 1 + bool(rest))]
        lines += [f"| {r['method']} | " + " | ".join(f"{v:.3f}" for v in r["val_ppl_seeds"])
                  + f" | {r['val_ppl']:.3f} |"
                  + (f" {statistics.fmean(r['val_ppl_seeds'][1:]):.3f} |" if rest else "")
                  for r in seeded]
    lines += clipping_notes(results)
    lines += sweep_notes(sweep or [], results, args)
    targets = target_table(results)
    if targets:
        lines += ["", "## Targets (issue #7)", "",
                  "Perplexities and tokens/s are the means over the seeds above; the peak is "
                  "above each process's baseline, so that libraries loaded before the model do "
                  "not count.", "", targets]
    return "\n".join(lines) + "\n"


def _stacked_bars(ax, ok, parts, labels):
    names = [r["method"] for r in ok]
    bottom = [0.0] * len(ok)
    for label, key, color in parts:
        vals = [max(0.0, (r[key] or 0) / 2 ** 20) for r in ok]
        ax.bar(names, vals, bottom=bottom, label=label, color=color, edgecolor="white", width=0.65)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, text in enumerate(labels):
        ax.text(i, bottom[i], text, ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(bottom) * 1.15 or 1)
    for t in ax.get_xticklabels():
        t.set_rotation(12)
        t.set_ha("right")
    ax.grid(axis="y", alpha=0.3)


def make_plot(results: list[dict], args, path: Path) -> bool:
    """Four panels: validation loss, time per step, exact weights/grads/state bytes, and
    peak memory above the baseline split into those and activations+other."""
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
    ref = next((r for r in ok if r["method"] == "adamw"), ok[0])
    tok = args.batch_size * args.seq_len
    fig, axes = plt.subplots(2, 2, figsize=(16, 11))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("--", "v")]
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=9,
                 frameon=False)

    ax = axes[0, 0]
    lows, highs = [], []
    for i, r in enumerate(ok):
        steps, losses = zip(*r["curve"])
        ls, mk = styles[i % len(styles)]
        ax.plot([s * tok / 1e6 for s in steps], losses, ls=ls, marker=mk, ms=4, lw=1.6,
                color=colors[i % 10], alpha=0.9,
                label=f"{r['method']}  (final {r['val_loss']:.3f}, ppl {r['val_ppl']:.2f})")
        finite = [v for v in losses if math.isfinite(v)]
        lows.append(min(finite, default=0))
        highs.append(finite[min(2, len(finite) - 1)] if finite else 1)
    lo, hi = min(lows), max(highs)
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Validation loss (same data, same token budget)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)

    ax = axes[0, 1]
    names = [r["method"] for r in ok]
    fwd = [r["fwd_ms"] or 0 for r in ok]
    bwd = [0 if r["per_layer"] else r["bwd_ms"] or 0 for r in ok]
    stp = [0 if r["per_layer"] else r["step_ms"] or 0 for r in ok]
    fused = [r["bwd_step_ms"] if r["per_layer"] else 0 for r in ok]
    ax.barh(names, fwd, color="#4c72b0", label="forward")
    ax.barh(names, bwd, left=fwd, color="#dd8452", label="backward")
    left = [a + b for a, b in zip(fwd, bwd)]
    ax.barh(names, stp, left=left, color="#55a868", label="optimizer step")
    ax.barh(names, fused, left=left, color="#8172b3", hatch="//",
            label="backward + step (per-layer)")
    for i, r in enumerate(ok):
        end = left[i] + stp[i] + fused[i]
        step = f"step {r['step_ms']:.1f} ms, " if r.get("step_ms") is not None else ""
        tps = f"{r['tokens_per_s']:,.0f} tok/s" if r["tokens_per_s"] else ""
        ax.text(end, i, f"  {step}{tps}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (mean)")
    ax.set_title("Time per step")
    ax.set_xlim(0, max(a + b + c for a, b, c in zip(left, stp, fused)) * 1.5 or 1)
    ax.legend(**below)
    ax.grid(axis="x", alpha=0.3)

    parts = [("weights", "weights_b", "#4c72b0"), ("gradients", "grads_b", "#dd8452"),
             ("optimizer state", "state_b", "#55a868")]
    exact = lambda r: r["weights_b"] + r["grads_b"] + r["state_b"]
    ax = axes[1, 0]
    _stacked_bars(ax, ok, parts, [f"{exact(r) / 2 ** 20:.2f} ({exact(r) / exact(ref):.2f}×)"
                                  for r in ok])
    ax.set_title(f"Weights + gradients + optimizer state (exact bytes; × vs {ref['method']})")
    ax.legend(**below)

    ax = axes[1, 1]
    _stacked_bars(ax, ok, parts + [("activations + other", "act_other_b", "#c7c7c7")],
                  [f"{(r['peak_above_b'] or 0) / 2 ** 20:.1f}" for r in ok])
    bases = sorted(r["baseline_b"] / 2 ** 20 for r in ok)
    base = f"{bases[0]:.0f}" + (f"–{bases[-1]:.0f}" if bases[-1] - bases[0] >= 1 else "")
    where = "GPU max allocated" if args.device.startswith("cuda") else "peak RSS"
    ax.set_title(f"Peak memory: {where} above baseline ({base} MiB in use before the model)")
    ax.legend(**below)

    cfg = C.get_config(args.config)
    fig.suptitle(f"{args.config} (dim {cfg.dim}, {cfg.n_layers} layers, "
                 f"{ok[0]['params'] / 1e6:.2f}M params), {args.steps} steps x {args.batch_size}"
                 f" x {args.seq_len} bytes, {args.device}", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Run the shoot-out; returns ``{"results", "table", "out", "files"}``."""
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
    runs = []
    print(f"shoot-out: {', '.join(args.method_list)} on {args.config}, {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len}, device {args.device} -> {out}", file=sys.stderr)
    corpus = C.load_corpus(args.data, args.val_fraction) if args.in_process else None
    args.select_eval = bool(args.sweep_grid)
    sweep, pool = [], load_resume(args.resume, argv) if args.resume else []
    args.resumed = []   # (method, seed, lr) taken from --resume, for the report
    resumed_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        def run(name, seed, lr, into):
            nonlocal resumed_s
            old = next((r for r in pool if (r["method"], r["seed"], r["lr"]) == (name, seed, lr)
                        and not r.get("error")), None)
            if old is not None:
                into.append(dict(old))
                args.resumed.append((name, seed, lr))
                resumed_s += old.get("wall_s") or 0.0
                return into[-1]
            run_args = argparse.Namespace(**{**vars(args), "seed": seed,
                                             "lrs": {**args.lrs, name: lr}})
            t = time.perf_counter()
            if not args.in_process:
                r = _run_subprocess(name, run_args, Path(tmp))
            else:
                try:
                    r = run_method(name, run_args, corpus)
                except Exception as e:
                    import traceback
                    traceback.print_exc()
                    r = dict(method=name, error=f"{type(e).__name__}: {e}")
                gc.collect()
            r.update(seed=seed, lr=lr, wall_s=time.perf_counter() - t)
            into.append(r)
            # what is done so far, should the run be cut short
            (out / "partial.json").write_text(json.dumps(dict(
                argv=argv, sweep=sweep, runs=runs, lrs=args.lrs), indent=1))
            return r

        if not args.sweep_grid:
            for name in args.method_list:
                for seed in args.seed_list:
                    run(name, seed, args.lrs[name], runs)
        else:
            first = args.seed_list[0]
            for name, rates in args.sweep_grid.items():
                for lr in rates:
                    r = run(name, first, lr, sweep)
                    print(f"sweep {name} lr {lr:g}: select loss {r.get('select_loss')}",
                          file=sys.stderr, flush=True)
                args.lrs[name] = best_rate(sweep, name)
            for name, parent in args.inherits.items():
                args.lrs[name] = args.lrs[parent]
            print("chosen rates: " + ", ".join(f"{n} {v:g}" for n, v in args.lrs.items()),
                  file=sys.stderr, flush=True)
            # seed by seed, so that a run cut short leaves whole seeds
            for seed in args.seed_list:
                for name in args.method_list:
                    done = [r for r in sweep if r["method"] == name and r["seed"] == seed
                            and r["lr"] == args.lrs[name]]
                    if done:
                        runs.append(dict(done[0]))
                    else:
                        run(name, seed, args.lrs[name], runs)
            order = {n: i for i, n in enumerate(args.method_list)}
            runs.sort(key=lambda r: (order[r["method"]], args.seed_list.index(r["seed"])))
    args.resumed_s = resumed_s
    written = _write(runs, args, argv, time.perf_counter() - t0 + resumed_s, out, sweep)
    (out / "partial.json").unlink(missing_ok=True)  # only now: a failed report keeps the runs
    return written


# what two runs must share for one to reuse the other's measurements (--resume)
_SAME = ("config", "vocab_size", "steps", "batch_size", "seq_len", "lr", "clip", "warmup", "min_lr_ratio", "weight_decay", "rank",
         "update_proj_gap", "scale", "eval_every", "eval_batches", "device", "dtype", "threads",
         "data", "val_fraction", "in_process", "malloc_default")


def load_resume(path: str, argv: list[str]) -> list[dict]:
    """The completed runs (sweep and seeds) of ``path`` (a ``partial.json``), after
    checking that its arguments agree with ``argv``'s on everything that shapes a run."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume {path}: {e}")
    mine, theirs = resolve(parse_args(argv)), resolve(parse_args(saved["argv"]))
    differ = [k for k in _SAME if getattr(mine, k) != getattr(theirs, k)]
    # a run is its method, seed and rate (matched run by run), whatever grid it came from;
    # only a sweep scores runs on the selection windows
    if bool(mine.sweep_grid) != bool(theirs.sweep_grid):
        differ.append("--lr-sweep (one run sweeps, the other does not)")
    if differ:
        raise SystemExit(f"--resume {path}: that run differs in {', '.join(differ)}")
    return saved.get("sweep", []) + saved.get("runs", [])


def _sweep_key(r: dict) -> float:
    """What the sweep minimises: the loss on the selection windows (inf if failed or
    diverged)."""
    v = None if r.get("error") or r.get("diverged_at") else r.get("select_loss")
    return v if v is not None and math.isfinite(v) else math.inf


def best_rate(sweep: list[dict], name: str) -> float:
    """The rate of ``name``'s sweep run with the lowest selection loss (ties: the smaller
    rate)."""
    mine = [r for r in sweep if r["method"] == name]
    return min(mine, key=lambda r: (_sweep_key(r), r["lr"]))["lr"]


def _report_from(path: Path, out: str | None, no_plot: bool) -> dict:
    saved = json.loads(path.read_text())
    args = argparse.Namespace(**saved["args"])
    args.no_plot, args.rendered_from = no_plot, str(path)
    if not hasattr(args, "seed_list"):  # written before --seeds existed
        args.seed_list = [args.seed]
    runs = saved.get("runs") or [dict(r, seed=args.seed) for r in saved["results"]]
    out = Path(out) if out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    return _write(runs, args, saved["argv"], saved["wall_s"], out, saved.get("sweep"))


def _write(runs: list[dict], args: argparse.Namespace, argv: list[str], wall: float,
           out: Path, sweep: list[dict] | None = None) -> dict:
    """Aggregate the runs over seeds, then write results.md, results.json and the plot."""
    results = aggregate(runs)
    add_estimates(results, args)
    report = make_report(results, args, argv, wall, sweep or [])
    files = {"table": out / "results.md", "json": out / "results.json"}
    files["table"].write_text(report)
    files["json"].write_text(json.dumps(dict(
        argv=argv, args={k: v for k, v in vars(args).items()}, wall_s=wall,
        results=results, runs=runs, sweep=sweep or []), indent=1))
    if not args.no_plot and make_plot(results, args, out / "shootout.png"):
        files["plot"] = out / "shootout.png"
    print("\n" + report)
    for k, v in files.items():
        print(f"{k}: {v}")
    return dict(results=results, runs=runs, table=report, out=out, files=files, wall_s=wall,
                args=args, sweep=sweep or [])


if __name__ == "__main__":
    main()
