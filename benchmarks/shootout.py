"""The main job: train one small LLaMA-style model with each optimizer and compare validation
loss, time per step, exact bytes and peak memory. What it measures and how: the
"shootout.py" section of docs/benchmarks.md.

    python benchmarks/shootout.py                      # the default methods, ~17 min on 2 CPU cores
    python benchmarks/shootout.py --methods adamw,galore,galore+state_on_refresh=keep --steps 200
    python benchmarks/shootout.py --config small --device cuda --steps 2000 --data ~/my_text
    python benchmarks/shootout.py --lr-sweep 0.5,1,2 --seeds 0,1,2   # tuned rates, 3 seeds
"""
from __future__ import annotations

import argparse, dataclasses, gc, json, math, os, statistics, subprocess, sys, time, traceback
from pathlib import Path

from _paths import HERE, ROOT

import torch

import common as C

MIN_LR_RATIO = 0.1   # the cosine decay ends at this fraction of the peak rate


def parse_args(argv=None) -> argparse.Namespace:
    """The options (docs/benchmarks.md; 0, -1 or "": a default that depends on the others)."""
    p = C.parser(__doc__, methods="", config="tiny", steps=500, batch_size=16, vocab_size=256,
                 update_proj_gap=200, scale=0.25, clip=1.0, weight_decay=0.0, eval_every=50,
                 eval_batches=8, seed=0, seq_len=0, rank=0, warmup=-1, threads=0, lr="",
                 lr_sweep="", seeds="", device="auto", dtype="float32", data="", out="",
                 in_process=False, malloc_default=False, no_plot=False, quiet=False, resume="")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if min(a.steps, a.batch_size, a.eval_every, a.eval_batches) < 1 or a.vocab_size < 256 \
            or not a.clip >= 0:
        p.error("--steps, --batch-size, --eval-every, --eval-batches must be >= 1, "
                "--vocab-size >= 256 (tokens are bytes), --clip >= 0")
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
    if missing := [f"{n} (needs {', '.join(m.requires)})" for n, m in methods.items()
                   if not m.available()]:
        raise SystemExit(f"not available here: {', '.join(missing)}")
    a.seq_len, a.rank, a.method_list = a.seq_len or cfg.seq_len, a.rank or cfg.dim // 4, names
    a.warmup = max(1, a.steps // 10) if a.warmup < 0 else a.warmup
    try:
        a.seed_list = [int(x) for x in a.seeds.split(",") if x.strip()] if a.seeds else [a.seed]
        if not a.seed_list or len(set(a.seed_list)) != len(a.seed_list):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--seeds: expected a comma list of distinct integers, got {a.seeds!r}")
    every, named = _per_method("--lr", a.lr or "", names)
    a.lrs = {n: float(every[-1]) if every else m.lr for n, m in methods.items()}
    a.lrs.update({k: float(v) for k, v in named.items() if k in a.lrs})
    a.sweep_grid, a.inherits = parse_sweep(a.lr_sweep, names, a.lrs) if a.lr_sweep else ({}, {})
    return a


def _per_method(flag: str, spec: str, names: list[str]) -> tuple[list, dict]:
    """``X,NAME=Y,...`` -> ([X, ...], {NAME: Y}), NAME a method of the registry or the run."""
    plain, named = [], {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        k, eq, v = (x.strip() for x in item.rpartition("="))
        if eq and k not in C.METHODS and k not in names:
            raise SystemExit(f"{flag}: unknown method {k!r}")
        if eq:
            named[k] = v
        else:
            plain.append(item)
    return plain, named


def parse_sweep(spec: str, names: list[str], lrs: dict) -> tuple[dict, dict]:
    """``--lr-sweep`` -> (``{method: [rates]}`` for the methods swept, ``{variant:
    parent}`` for the variants that take their parent's best rate)."""
    plain, named = _per_method("--lr-sweep", spec, names)
    try:
        mults = [float(x) for x in plain]
        explicit = {k: [float(x) for x in v.split(":") if x.strip()] for k, v in named.items()}
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


# --- One method's run ---

def _warm_up(method: C.Method, args: argparse.Namespace, device: torch.device) -> None:
    """Two steps of the method on a throwaway small model, before memory is measured: the
    kernels' code pages and CUDA's context then sit in the baseline, not in the peak."""
    cfg = C.get_config("tiny", vocab_size=args.vocab_size, seq_len=32)
    model, opt, hooks = method.build(C.LlamaLM(cfg).to(device=device, dtype=getattr(
        torch, args.dtype)), C.MethodArgs(lr=1e-4, rank=min(args.rank, cfg.dim // 4)))
    idx = torch.randint(0, 256, (2, 33), device=device)
    for _ in range(2):
        model(idx[:, :-1], idx[:, 1:]).backward()
        if not method.per_layer:
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(idx[:, :-1], idx[:, 1:])
    if hooks is not None:
        hooks.remove()
    del model, opt, hooks
    gc.collect()
    C.release_memory(device)


def model_config(args: argparse.Namespace) -> C.ModelConfig:
    """``args.config`` with its vocabulary and a rotary table long enough for ``--seq-len``."""
    seq_len = max(args.seq_len, C.get_config(args.config).seq_len)
    return C.get_config(args.config, vocab_size=args.vocab_size, seq_len=seq_len)


def run_method(name: str, args: argparse.Namespace, corpus: C.Corpus | None = None) -> dict:
    """Train ``args.config`` with method ``name``; return the measurements as a dict."""
    device = torch.device(args.device)
    corpus = corpus if corpus is not None else C.load_corpus(args.data or None)
    method, clip = C.method(name), args.clip
    _warm_up(method, args, device)
    meter = C.MemoryMeter(device)
    meter.start()

    torch.manual_seed(args.seed)
    model = C.LlamaLM(model_config(args)).to(device=device, dtype=getattr(torch, args.dtype))
    model, opt, hooks = method.build(model, C.MethodArgs(
        lr=args.lrs[name], rank=args.rank, update_proj_gap=args.update_proj_gap,
        scale=args.scale, weight_decay=args.weight_decay, max_grad_norm_per_param=clip or None))
    per_layer = method.per_layer
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, C.lr_lambda(args.warmup, args.steps, MIN_LR_RATIO))
    batches = C.Batches(corpus, args.batch_size, args.seq_len, args.seed, args.eval_batches,
                        device)
    t_fwd, t_bwd, t_opt, t_all = (C.Timer(device) for _ in range(4))
    curve, train_loss, grad_norms, diverged = [(0, C.evaluate(model, batches.val))], [], [], None
    every = max(1, args.steps // 10)
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
            curve.append((step, C.evaluate(model, batches.val)))
        if not args.quiet and (step % every == 0 or step == args.steps):
            print(f"  {name}: step {step}/{args.steps}  train {loss_v:.4f}  "
                  f"val {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
        if diverged:
            break

    select = C.evaluate(model, batches.select) if getattr(args, "select_eval", False) else None
    ms = lambda t: 1000 * t.total / t.count if t.count else None
    peak, weights = meter.peak(), C.weight_bytes(model)
    grads, state = C.grad_bytes(model, per_layer=per_layer), C.state_bytes(opt)
    above = None if peak is None else peak - meter.baseline
    if hooks is not None:
        hooks.remove()
    return dict(
        method=name, description=method.description, lr=args.lrs[name], per_layer=per_layer,
        params=C.count_params(model), val_loss=curve[-1][1], curve=curve, diverged_at=diverged,
        val_ppl=math.exp(min(curve[-1][1], 700)), train_loss=train_loss, select_loss=select,
        select_disjoint=batches.select_disjoint, iter_ms=ms(t_all) or 0.0,
        tokens_per_s=1000 * args.batch_size * args.seq_len / ms(t_all) if t_all.count else None,
        fwd_ms=ms(t_fwd), bwd_ms=ms(t_bwd), step_ms=None if per_layer else ms(t_opt),
        bwd_step_ms=(ms(t_bwd) or 0) + (0 if per_layer else ms(t_opt) or 0),
        weights_b=weights, grads_b=grads, state_b=state, peak_b=peak,
        baseline_b=meter.baseline, peak_above_b=above,
        act_other_b=None if above is None else above - weights - grads - state,
        memory_kind=meter.kind, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        clipping="none" if not clip else "per-parameter" if per_layer else "global", clip=clip,
        trained_params=sum(p.requires_grad for p in model.parameters()),
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


def _run_subprocess(name: str, args: argparse.Namespace) -> dict:
    """One run in its own process (``--_worker``: the resolved arguments in, the result out
    as the last line of its stdout), so that peak memories do not mix. On CPU it gets
    glibc's ``MALLOC_MMAP_THRESHOLD_=131072``: freed tensors go back to the system and peak
    RSS follows live memory, not heap fragmentation."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), str(HERE), os.environ.get("PYTHONPATH")])))
    if args.device == "cpu" and not args.malloc_default:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker",
                           json.dumps(dict(vars(args), _worker=name))],
                          env=env, stdout=subprocess.PIPE, text=True)
    try:
        return json.loads(proc.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        return dict(method=name, error=f"worker exited with status {proc.returncode}")


# --- Seeds, estimates and targets ---

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
        seeds, bad = [r["seed"] for r in rs], next((r for r in rs if r.get("error")), None)
        if len(rs) == 1 or bad:
            rows.append(rs[0] if len(rs) == 1 else dict(
                method=name, seeds=seeds, error=f"seed {bad['seed']}: {bad['error']}"))
            continue
        row = dict(rs[0], seeds=seeds, val_ppl_seeds=[r["val_ppl"] for r in rs],
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
    """Each result's ``estimate_b`` (the papers' sum) and ``peak_model_b`` from
    ``estimate_memory.py`` (None for a method it does not model)."""
    import estimate_memory as E
    cfg, dt, dev = model_config(args), getattr(torch, args.dtype), args.device.split(":")[0]
    todo = [r for r in results if not r.get("error") and r["method"] in E.METHODS]
    acts = E.activation_bytes(cfg, args.batch_size, args.seq_len, dt, False) if todo else 0
    for r in results:
        r["estimate_b"] = r["peak_model_b"] = None
    for r in todo:
        r["estimate_b"] = sum(E.estimate(r["method"], cfg, args.rank, dt, acts).values())
        r["peak_model_b"] = E.peak_model(r["method"], cfg, args.rank, dt, args.batch_size,
                                         args.seq_len, device=dev)["peak"]


def target_table(results: list[dict]) -> str:
    """The issue's targets for the main job (#7) that the methods run here can check, as a
    Markdown table ('' if none); met: yes, **no**, or – when this run cannot decide."""
    by, rows = {r["method"]: r for r in results if not r.get("error")}, []
    add = lambda what, text, met: rows.append(
        [what, text, "–" if met is None else "yes" if met else "**no**"])
    ratios = lambda q: ", ".join(f"{n} {v:.2f}×" for n, v in q.items())
    for name, ref, limit in (("galore", "adamw", 1.03), ("qgalore", "galore", 1.02),
                             ("loqt", "galore", 1.0)):
        if name in by and ref in by:
            q = by[name]["val_ppl"] / by[ref]["val_ppl"]
            seeds = min(len(by[n].get("seeds", [0])) for n in (name, ref))
            # the quality targets are on the mean of 3 seeds
            add(f"{name} validation ppl ≤ {limit:g}× {ref}'s",
                f"{q:.3f}× ({by[name]['val_ppl']:.3f} / {by[ref]['val_ppl']:.3f})"
                + (f", {seeds} seed(s): run --seeds 0,1,2 to check" if seeds < 3 else ""),
                q <= limit if seeds >= 3 else None)
    peak = {n: r["peak_above_b"] for n, r in by.items() if r.get("peak_above_b") is not None}
    low = {n: peak[n] / peak["adamw"] for n in peak
           if n.startswith(("galore", "qgalore", "loqt")) and "adamw" in peak}
    if low:
        add("peak memory above baseline of every low-rank method < adamw's", ratios(low),
            all(v < 1 for v in low.values()))
    if "qgalore_per_layer" in peak and len(by) >= 2:
        lowest, mib = min(peak, key=peak.get), lambda n: f"{peak[n] / 2 ** 20:.1f} MiB"
        add("qgalore_per_layer has the lowest peak memory above baseline", f"lowest: {lowest} "
            f"({mib(lowest)}); qgalore_per_layer {mib('qgalore_per_layer')}",
            lowest == "qgalore_per_layer")
    model = {n: peak[n] / by[n]["peak_model_b"] for n in peak if by[n].get("peak_model_b")}
    if model:
        add("peak memory above baseline within 10% of estimate_memory.py's peak model",
            ratios(model), all(abs(v - 1) <= 0.1 for v in model.values()))
    if "galore" in by and by.get("adamw", {}).get("tokens_per_s"):
        q = by["galore"]["tokens_per_s"] / by["adamw"]["tokens_per_s"]
        add("galore tokens/s ≥ 0.9× adamw's", f"{q:.2f}×", q >= 0.9)
    return C.md_table(["target", "measured", "met"], rows) if rows else ""


# --- Report ---

mib = lambda b: "—" if b is None else f"{b / 2 ** 20:.2f}"
num = lambda v, fmt: "—" if v is None else format(v, fmt)
ratio = lambda v, ref: "—" if v is None or not ref else f"{v / ref:.2f}×"


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
    quality = [[r["method"], f"failed: {r['error']}"] + [""] * 11 if r.get("error") else [
        name(r), f"{r['lr']:g}", _clip_cell(r),
        _loss_cell(r),
        f"{r['val_ppl']:.3f}" + (f" ± {r['val_ppl_std']:.3f}" if "val_ppl_std" in r else ""),
        ratio(r["val_ppl"], ref["val_ppl"]), num(r["tokens_per_s"], ",.0f"),
        num(r["fwd_ms"], ".1f"), "—" if r["per_layer"] else num(r["bwd_ms"], ".1f"),
        "— ¹" if r["per_layer"] else num(r["step_ms"], ".2f"), num(r["bwd_step_ms"], ".1f"),
        num(r.get("wall_s"), ".0f"), num(r.get("svds"), ".0f")] for r in results]
    wgs = lambda r: r["weights_b"] + r["grads_b"] + r["state_b"]
    memory = [[name(r), mib(r["weights_b"]), mib(r["grads_b"]), mib(r["state_b"]),
               mib(r["act_other_b"]), mib(r["peak_above_b"]), mib(r["peak_b"]),
               ratio(r["state_b"], ref["state_b"]), ratio(wgs(r), wgs(ref)),
               ratio(r["peak_above_b"], ref["peak_above_b"]), mib(r.get("estimate_b")),
               mib(r.get("peak_model_b")), ratio(r["peak_above_b"], r.get("peak_model_b"))]
              for r in ok]
    return C.md_table(
        ["method", "lr", "clipping", "val loss", "val ppl", f"ppl vs {rname}", "tokens/s",
         "fwd ms", "bwd ms", "opt step ms", "bwd+step ms", "run s", "SVDs"], quality) + \
        "\n\n" + C.md_table(
        ["method", "weights MiB", "grads MiB", "opt state MiB", "activations+other MiB",
         "peak above baseline MiB", "peak MiB", f"state vs {rname}",
         f"weights+grads+state vs {rname}", f"peak above baseline vs {rname}",
         "estimate (sum) MiB", "peak model MiB", "peak above baseline / model"], memory)


NOTES = ("¹ per-layer mode (`opt.register_hooks(model)`): the update runs inside backward. "
         "Columns: see the shootout.py section of docs/benchmarks.md.")


def _loss_cell(r: dict) -> str:
    div = f" (diverged at {r['diverged_at']})" if r.get("diverged_at") else ""
    return f"{r['val_loss']:.4f}{div}"


def sections(results: list[dict], args, sweep: list[dict]) -> list[str]:
    """Perplexity per seed, gradient clipping, the learning-rate sweep, the targets."""
    ok, out = [r for r in results if not r.get("error")], []
    if seeded := [r for r in results if "val_ppl_seeds" in r]:
        rest = args.seed_list[1:] if sweep else []   # the seeds that did not choose the rate
        extra = [f"mean of seed{'s' * (len(rest) > 1)} {', '.join(map(str, rest))} (not used "
                 "to choose the rate)"] * bool(rest)
        out += ["", "Validation perplexity per seed:", "", C.md_table(
            ["method", *(f"seed {s}" for s in args.seed_list), "mean", *extra],
            [[r["method"], *(f"{v:.3f}" for v in r["val_ppl_seeds"]), f"{r['val_ppl']:.3f}"]
             + ([f"{statistics.fmean(r['val_ppl_seeds'][1:]):.3f}"] if rest else [])
             for r in seeded])]
    if any(_clip_cell(r) != "none" for r in ok):
        out += ["", "## Gradient clipping", "", "Normal stepping clips the global norm "
                "(`clip_grad_norm_(model.parameters(), clip)`); per-layer mode (¹) each gradient "
                "on its own (`register_hooks(model, max_grad_norm_per_param=clip)`).", "",
                C.md_table(["method", "clipping", "gradients it covers", "steps clipped",
                            "mean grad norm (before clipping)"], [
                    [r["method"], _clip_cell(r), "—" if _clip_cell(r) == "none" else
                     f"all {r['trained_params']} trained tensors",
                     "—" if (f := r.get("clipped_frac")) is None else f"{100 * f:.0f}%",
                     num(r.get("grad_norm_mean"), ".3f")]
                    for r in ok])]
    if sweep:
        chosen = {r["method"]: r.get("lr") for r in results}
        overlap = not all(r.get("select_disjoint") for r in sweep if not r.get("error"))
        out += ["", "## Learning-rate sweep", "", f"Grid `--lr-sweep {args.lr_sweep}` on seed "
                f"{args.seed_list[0]}, each rate scored on the selection windows (validation "
                "windows between the reported ones" + (", overlapping them here" * overlap)
                + "); the lowest wins and the other seeds run at its rate.", ""]
        if args.inherits:
            out += ["Not swept: " + ", ".join(f"{n} takes {p}'s rate"
                                              for n, p in args.inherits.items()) + ".", ""]
        out.append(C.md_table(["method", "lr", "select loss", "val loss", "val ppl", ""], [
            [r["method"], f"{r['lr']:g}"] + ([f"failed: {r['error']}", "", ""] if r.get("error")
                                              else [num(r.get("select_loss"), ".4f"),
                                                    _loss_cell(r), f"{r['val_ppl']:.3f}"])
            + ["**best**" if chosen.get(r["method"]) == r["lr"] else ""] for r in sweep]))
    if targets := target_table(results):
        out += ["", "## Targets (issue #7)", "", "Perplexities and tokens/s are the means over "
                "the seeds above; the peak is above each process's baseline.", "", targets]
    return out


def make_report(results: list[dict], args, argv: list[str], wall_s: float,
                sweep: list[dict]) -> str:
    cfg = C.get_config(args.config, vocab_size=args.vocab_size)
    ok = [r for r in results if not r.get("error")]
    first, seeds = ok[0] if ok else {}, args.seed_list
    resumed = (f" ({len(args.resumed)} runs, {args.resumed_s:.0f} s, taken from the run cut "
               "short that `--resume` names: " + ", ".join(
                   f"{n} seed {sd} lr {lr:g}" for n, sd, lr in args.resumed) + ")"
               if args.resumed else "")
    lrs = "the best of `--lr-sweep` per method (see Learning-rate sweep)" if sweep else \
        "each method's default (common.METHODS)" + (f" or `--lr {args.lr}`" if args.lr else "")
    meta = C.report_meta("shootout.py", argv,
                         f"{first.get('device_name', args.device)}; parameters {args.dtype}",
                         corpus=f"{first.get('corpus', '?')} (byte tokens)")
    meta["date"] += f"; total wall time {wall_s:.0f} s{resumed}"
    meta.update({
        "model": f"`{args.config}` {dataclasses.asdict(cfg)}"
                 + (f", {first['params'] / 1e6:.3f}M parameters" if ok else ""),
        "budget": f"{args.steps} steps x {args.batch_size} x {args.seq_len} = "
                  f"{args.steps * args.batch_size * args.seq_len:,} tokens per method and seed, "
                  + (f"seed {seeds[0]}" if len(seeds) == 1 else
                     f"seeds {', '.join(map(str, seeds))} (quality and time: mean ± standard "
                     "deviation over seeds; memory: the largest peak)")
                  + f"; linear warmup {args.warmup} steps then cosine to {MIN_LR_RATIO:g} x lr"
                  f"; weight decay {args.weight_decay:g}; "
                  + (f"gradient clipping at norm {args.clip:g} (global; per parameter in "
                     "per-layer mode: see Gradient clipping)" if args.clip else
                     "no grad clipping"),
        "optimizers": f"lr: {lrs}; rank {args.rank}, update_proj_gap {args.update_proj_gap}, "
                      f"scale {args.scale:g} on the attention and MLP matrices",
        "validation": f"{args.eval_batches} fixed batches; loss in nats per byte, ppl = exp",
        "memory": first.get("memory_kind", "?") + (
            " in one process (--in-process): indicative only" if args.in_process
            else ", each method in its own process")
        + (f"; baseline {mib(first['baseline_b'])} MiB" if first.get("baseline_b") else "")
        + (f"; MALLOC_MMAP_THRESHOLD_={first['malloc_mmap_threshold']}"
           if first.get("malloc_mmap_threshold") else "")})
    body = [make_table(results), "", NOTES, *sections(results, args, sweep)]
    return C.write_report(None, "Optimizer shoot-out", meta, "\n".join(body))


def make_plot(results: list[dict], args, path: Path) -> bool:
    """Validation-loss curves, and peak memory above baseline split by kind."""
    if not (ok := [r for r in results if not r.get("error")]) or not (plt := C.pyplot()):
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(17, 6.5))
    for r in ok:
        steps, losses = zip(*r["curve"])
        ax.plot([s * args.batch_size * args.seq_len / 1e6 for s in steps], losses, marker="o",
                ms=3, label=f"{r['method']}  (final {r['val_loss']:.3f}, ppl {r['val_ppl']:.2f})")
    late = [v for r in ok for _, v in r["curve"][2:] if math.isfinite(v) and len(r["curve"]) > 4]
    if late and max(late) > min(late):   # from the third point on: the first ones dwarf the rest
        ax.set_ylim(min(late) - 0.05 * (max(late) - min(late)), max(late))
    ax.set(xlabel="training tokens (M)", ylabel="validation loss (nats/byte)",
           title="Validation loss (same data, same token budget)")
    names, bottom = [r["method"] for r in ok], [0.0] * len(ok)
    for label, key in (("weights", "weights_b"), ("gradients", "grads_b"),
                       ("optimizer state", "state_b"), ("activations + other", "act_other_b")):
        vals = [max(0.0, (r[key] or 0) / 2 ** 20) for r in ok]
        bx.bar(names, vals, bottom=bottom, label=label, width=0.65)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(ok):
        bx.text(i, bottom[i], f"{mib(r['peak_above_b'])}\n{num(r['tokens_per_s'], ',.0f')} tok/s",
                ha="center", va="bottom", fontsize=9)
    where = "GPU max allocated" if args.device.startswith("cuda") else "peak RSS"
    bx.set(ylabel="MiB", title=f"Peak memory: {where} above baseline",
           ylim=(0, max(bottom) * 1.3 or 1))
    bx.tick_params(axis="x", labelrotation=12)
    ax.legend(fontsize=9)
    bx.legend(fontsize=9, ncol=4, loc="upper center")
    for x in (ax, bx):
        x.grid(alpha=0.3)
    fig.suptitle(f"{args.config} ({ok[0]['params'] / 1e6:.2f}M params), {args.steps} steps x "
                 f"{args.batch_size} x {args.seq_len} bytes, {args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- Driver: sweep, seeds, --resume ---

def main(argv=None) -> dict:
    """Run the shoot-out; returns its results, runs, sweep, table, files and arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, threads = parse_args(argv), torch.get_num_threads()
    if args._worker:   # one run of _run_subprocess: the parent's resolved arguments
        args = argparse.Namespace(**json.loads(args._worker))
        torch.set_num_threads(args.threads or threads)
        print(json.dumps(_run_guarded(args._worker, args)))
        raise SystemExit(0)
    torch.set_num_threads(args.threads or threads)
    try:
        return _main(resolve(args), argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: list[str]) -> dict:
    out = Path(args.out or ROOT / "runs" / time.strftime("shootout-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    t0, log = time.perf_counter(), lambda msg: print(msg, file=sys.stderr, flush=True)
    log(f"shoot-out: {', '.join(args.method_list)} on {args.config}, {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len}, device {args.device} -> {out}")
    corpus = C.load_corpus(args.data or None) if args.in_process else None
    args.select_eval = bool(args.sweep_grid)
    sweep, runs, pool = [], [], load_resume(args.resume, argv) if args.resume else []
    args.resumed, args.resumed_s = [], 0.0   # (method, seed, lr) taken from --resume

    def run(name, seed, lr, into):
        same = lambda r: (r["method"], r["seed"], r["lr"]) == (name, seed, lr)
        if into is runs and (won := next(filter(same, sweep), None)):  # the sweep's run
            into.append(dict(won))
            return won
        if old := next((r for r in pool if same(r) and not r.get("error")), None):
            args.resumed.append((name, seed, lr))
            args.resumed_s += old.get("wall_s") or 0.0
            into.append(dict(old))
            return old
        run_args = argparse.Namespace(**{**vars(args), "seed": seed, "lrs": {**args.lrs, name: lr}})
        t = time.perf_counter()
        r = _run_guarded(name, run_args, corpus) if args.in_process else \
            _run_subprocess(name, run_args)
        gc.collect()
        r.update(seed=seed, lr=lr, wall_s=time.perf_counter() - t)
        into.append(r)
        (out / "partial.json").write_text(json.dumps(dict(  # should the run be cut short
            argv=argv, sweep=sweep, runs=runs, lrs=args.lrs), indent=1))
        return r

    for name, rates in args.sweep_grid.items():      # on the first seed
        for lr in rates:
            r = run(name, args.seed_list[0], lr, sweep)
            log(f"sweep {name} lr {lr:g}: select loss {r.get('select_loss')}")
        args.lrs[name] = best_rate(sweep, name)
    args.lrs.update({name: args.lrs[parent] for name, parent in args.inherits.items()})
    # a sweep runs seed by seed, so that a run cut short leaves whole seeds
    order = [(n, s) for s in args.seed_list for n in args.method_list] if args.sweep_grid \
        else [(n, s) for n in args.method_list for s in args.seed_list]
    for name, seed in order:
        run(name, seed, args.lrs[name], runs)
    runs.sort(key=lambda r: (args.method_list.index(r["method"]),
                             args.seed_list.index(r["seed"])))
    results, wall = aggregate(runs), time.perf_counter() - t0 + args.resumed_s
    add_estimates(results, args)
    report = make_report(results, args, argv, wall, sweep)
    files = {"table": out / "results.md", "json": out / "results.json"}
    files["table"].write_text(report)
    files["json"].write_text(json.dumps(dict(argv=argv, args=vars(args), wall_s=wall,
                                             results=results, runs=runs, sweep=sweep), indent=1))
    if not args.no_plot and make_plot(results, args, out / "shootout.png"):
        files["plot"] = out / "shootout.png"
    print("\n" + report + "".join(f"\n{k}: {v}" for k, v in files.items()))
    (out / "partial.json").unlink(missing_ok=True)  # only now: a failed report keeps the runs
    return dict(results=results, runs=runs, table=report, out=out, files=files, wall_s=wall,
                args=args, sweep=sweep)


# the arguments two runs may differ in when one reuses the other's measurements (--resume)
_FREE = ("methods", "lr_sweep", "seed", "seeds", "out", "no_plot", "quiet", "resume", "_worker")


def load_resume(path: str, argv: list[str]) -> list[dict]:
    """The completed runs of ``path`` (a ``partial.json``) whose arguments shape runs as
    ``argv``'s do."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume {path}: {e}")
    mine, theirs = resolve(parse_args(argv)), resolve(parse_args(saved["argv"]))
    differ = [k for k in vars(parse_args([])) if k not in _FREE
              and getattr(mine, k) != getattr(theirs, k)]
    if bool(mine.sweep_grid) != bool(theirs.sweep_grid):   # only a sweep scores selection
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


if __name__ == "__main__":
    main()
