"""Peak memory of ONE REAL training step of a big LLaMA model, one fresh process per
METHOD:CONFIG[:SEQ][:ckpt] case (docs/benchmarks.md).

    python benchmarks/bench_peak.py                                 # the issues' cases (hours)
    python benchmarks/bench_peak.py --configs llama_60m             # smoke test (~2 min)
    python benchmarks/bench_peak.py --cases qgalore:llama_7b:256:ckpt --merge   # add a row
    python benchmarks/bench_peak.py --cases loqt8bit_per_layer:llama_13b:32 --merge \\
        --estimate-only REASON                                      # a meta-count row only
    python benchmarks/bench_peak.py --device cuda --timeout 165 --cases \\
        qgalore:llama_7b:256:ckpt,loqt8bit:llama_7b:256,loqt8bit_per_layer:llama_13b:256
"""
from __future__ import annotations

import datetime, json, os, re, shlex, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import common as C  # puts the checkout first on sys.path
import lowrank_optim as lo
import torch
from _paths import ROOT

CASES = ("qgalore:llama_7b:256,loqt8bit:llama_7b:256,loqt8bit_per_layer:llama_13b:32,"
         "qapollo_mini:llama_7b:256:ckpt")
OUT = {"cpu": "benchmarks/results/peak.md", "cuda": "benchmarks/results/gpu/peak.md"}
BATCH, VOCAB, SEED = 1, 32000, 0
GB, GIB = 1e9, 2 ** 30
SMALL_BOUND = 2e9         # cases whose weights + state + grads stay below run two at a time
RUNTIME = 0.28e9          # RSS of the child after importing torch, bitsandbytes, the package
RANKS = {"micro": 16, "tiny": 32, "small": 64, "llama_60m": 128, "llama_130m": 256,
         "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024, "llama_13b": 1024}
# this script's method names (the keys of its rows) -> common.METHODS entries
METHODS = {"qgalore": "qgalore_per_layer", "qgalore_step": "qgalore", "loqt": "loqt",
           "loqt8bit": "loqt8bit", "loqt8bit_per_layer": "loqt8bit_per_layer",
           "qapollo_mini": "apollo_mini_int8_per_layer"}
ISSUE_METHODS = ("qgalore", "loqt8bit", "loqt8bit_per_layer", "qapollo_mini")
# the issues' targets: (method family, config, per-layer) -> (GB, issue)
TARGET_GB = {("qgalore", "llama_7b", True): (16, "#4: 7B, seq 256, per-layer, < 16 GB"),
             ("loqt", "llama_7b", False): (24, "#5: 7B without per-layer updates, < 24 GB"),
             ("loqt", "llama_13b", True): (24, "#5: 13B, per-layer + 8-bit moments, < 24 GB"),
             ("apollo", "llama_7b", True): (12, "#18: 7B, INT8 + APOLLO-Mini + per-layer, seq "
                                                "256, ckpt, ≤ 12 GB")}


def method(name: str) -> C.Method:
    return C.METHODS[METHODS[name]]


def family(name: str) -> str:
    return "qgalore" if name.startswith("qgalore") else "apollo" if "apollo" in name else "loqt"


def method_args(name: str, rank: int) -> C.MethodArgs:
    """The papers' 7B/13B scripts' settings (LoQT merges every 100 steps: run_one)."""
    return C.MethodArgs(rank=rank, **{"qgalore": dict(lr=0.004, update_proj_gap=500, scale=0.25),
                                      "apollo": dict(lr=1e-2, update_proj_gap=200),
                                      "loqt": dict(lr=1e-3, scale=0.5)}[family(name)])


@dataclass
class Case:
    method: str
    config: str
    seq: int = 256
    ckpt: bool = False

    @property
    def key(self) -> str:
        return f"{self.method}:{self.config}:{self.seq}" + (":ckpt" if self.ckpt else "")

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.strip().split(":")
        if len(parts) < 2 or parts[0] not in METHODS:
            raise ValueError(f"bad case {text!r}: expected METHOD:CONFIG[:SEQ][:ckpt] with "
                             f"METHOD one of {', '.join(METHODS)}")
        c = cls(parts[0], parts[1] if parts[1] in C.CONFIGS else f"llama_{parts[1]}")
        C.get_config(c.config)  # raises on an unknown name
        for extra in parts[2:]:
            if extra != "ckpt" and not extra.isdigit():
                raise ValueError(f"bad case {text!r}: {extra!r} is neither a length nor 'ckpt'")
            c.ckpt |= extra == "ckpt"
            c.seq = int(extra) if extra.isdigit() else c.seq
        return c

    def rank(self, a) -> int:
        """``--rank``, else the config's; 1 for APOLLO-Mini, whose registry entry fixes it."""
        if method(self.method).optimizer_class == "APOLLOMini":
            return 1
        return a.rank or RANKS.get(self.config, 128)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the child: one measurement -----------------------------------------------------------
class UpdateMeter:
    """Wraps ``lowrank_optim.functional.adam8bit_`` to split a CPU step's peak at the updates
    of tensors of >= ``min_numel`` elements: during them, outside them, each call's rise."""

    def __init__(self, mem, min_numel: int = 1 << 20):
        self.mem, self.min_numel, self.inner = mem, min_numel, lo.functional.adam8bit_
        lo.functional.adam8bit_ = self

    def start(self) -> None:
        self.outside, self.calls = 0, []

    def __call__(self, g, *args, **kwargs):
        if g.numel() < self.min_numel:
            return self.inner(g, *args, **kwargs)
        self.outside = max(self.outside, self.mem.peak())
        before = self.mem.current()
        self.mem.reset()
        try:
            return self.inner(g, *args, **kwargs)
        finally:
            self.calls.append(dict(numel=g.numel(), rss_before=before, peak=self.mem.peak()))
            self.mem.reset()

    def summary(self) -> dict:
        self.outside = max(self.outside, self.mem.peak())
        rises = [dict(c, transient=c["peak"] - c["rss_before"]) for c in self.calls]
        return dict(outside=self.outside, n_calls=len(self.calls),
                    during=max((c["peak"] for c in self.calls), default=0),
                    largest_transient=max(rises, key=lambda c: c["transient"], default=None))


class SVDCounter:
    """Wraps ``lowrank_optim.projector.compute_basis`` to count and time the SVDs and to set
    the randomized SVD's power iterations (``niter``; None: the package's default)."""

    def __init__(self, niter, mem):
        self.count, self.seconds, self.niter, self.mem = 0, 0.0, niter, mem
        self.inner, lo.projector.compute_basis = lo.projector.compute_basis, self

    def __call__(self, *args, **kwargs):
        if self.niter is not None:
            kwargs["niter"] = self.niter
        self.mem.sync()
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.mem.sync()
            self.count, self.seconds = self.count + 1, self.seconds + time.perf_counter() - t0


def swap(module, name: str, rank: int, a):
    """The registry's swap of ``name`` on ``module`` (a block, or a whole meta model)."""
    m = method(name)
    svd = {"svd": a.svd} if family(name) == "loqt" else {}
    return m.prepare(module, method_args(name, rank), **m.prepare_kwargs, **svd)


def build_model(case: Case, rank: int, a, mem):
    """LlamaLM on meta, then block by block: materialise in bf16 on ``mem``'s device with
    LlamaLM's initialisation, convert, free the float weights."""
    dev = mem.device
    cfg = C.get_config(case.config, vocab_size=VOCAB, seq_len=case.seq)
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = C.LlamaLM(cfg, checkpointing=case.ckpt)
    model.to(torch.bfloat16)
    materialise = lambda module: C.init_(module.to_empty(device=dev), cfg.n_layers)
    for i, block in enumerate(model.layers):
        materialise(block)
        swap(block, case.method, rank, a)
        if i == 0 or (i + 1) % 8 == 0:
            mem.trim()
            log(f"  block {i + 1}/{cfg.n_layers} converted, {mem.what} "
                f"{mem.current() / GB:.2f} GB")
    for module in (model.embed, model.norm, model.lm_head):
        materialise(module)
    cos, sin = C.rotary_table(cfg.seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
    model._buffers["rope_cos"], model._buffers["rope_sin"] = cos.to(dev), sin.to(dev)
    return model, cfg


def weights_of(model) -> dict:
    """Bytes of the model's tensors, each storage once (on meta too): integer codes, float
    buffers (scales, offsets, absmax), float parameters, the rotary table."""
    w, seen = dict(codes=0, scales=0, float_params=0, rope=0), set()
    for name, kind, t in C.stored_tensors(model):
        key = (C.storage_id(t), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            w["codes" if not t.is_floating_point() else "rope" if name.startswith("rope_")
              else "scales" if kind == "b" else "float_params"] += C.tensor_bytes(t)
    return dict(w, total=sum(w.values()))


def run_one(case: Case, a) -> dict:
    """Build, then ``a.steps`` steps, each with its own peak; prints PARTIAL rows."""
    torch.set_num_threads(a.threads)
    m, rank = method(case.method), case.rank(a)
    mem = C.MemoryMeter(a.device)  # RSS or the CUDA allocator
    counter = SVDCounter(a.svd_niter, mem)
    meter = None if mem.cuda else UpdateMeter(mem)  # CUDA's 8-bit kernel updates in place
    mem.trim()
    runtime, can_reset = mem.current(), mem.reset()
    log(f"{case.key}: building (runtime {mem.what} {runtime / GB:.2f} GB)")
    t0 = time.perf_counter()
    model, cfg = build_model(case, rank, a, mem)
    _, opt, hooks = m.build(model, method_args(case.method, rank), True, **{  # LoQT merges at 0
        "qgalore": dict(svd=a.svd, seed=SEED), "apollo": dict(seed=SEED),
        "loqt": dict(update_proj_gap=100, ec_iters=a.ec_iters)}[family(case.method)])
    build_peak, build_reserved, build_s = mem.peak(), mem.reserved(), time.perf_counter() - t0
    weights = weights_of(model)
    log(f"{case.key}: built in {build_s:.0f} s; weights {weights['total'] / GB:.2f} GB, "
        f"build peak {build_peak / GB:.2f} GB")
    loqt_layers = [x for x in model.modules() if isinstance(x, lo.LoQTLinear)]
    gen = torch.Generator().manual_seed(SEED)
    steps = []

    def result() -> dict:
        res = dict(case=asdict(case), key=case.key, method=case.method, rank=rank,
                   per_layer=m.per_layer, description=m.description,
                   n_params=sum(p.numel() for p in model.parameters()), runtime=runtime,
                   build_peak=build_peak, build_s=build_s, weights=weights, state=dict(
                       total=C.state_bytes(opt), basis=sum(
                           C.tensor_bytes(v) for st in opt.state.values() for k, v in st.items()
                           if k.startswith("proj") and torch.is_tensor(v))),
                   grads=C.grad_bytes(model, m.per_layer), steps=steps,
                   peak=max([build_peak] + [s["peak"] for s in steps]), peak_reset=can_reset,
                   threads=a.threads, svd=a.svd, svd_niter=a.svd_niter, ec_iters=a.ec_iters,
                   batch=BATCH, vocab=VOCAB)
        if mem.cuda:  # the GPU and versions, for the table's header
            gpu = torch.cuda.get_device_properties(mem.device)
            env = dict(gpu=gpu.name, gpu_memory=gpu.total_memory, cuda=torch.version.cuda,
                       capability=f"{gpu.major}.{gpu.minor}", versions=C.versions())
            res.update(device="cuda", env=env, build_reserved=build_reserved,
                       reserved=max([build_reserved] + [s["reserved"] for s in steps]))
        return res

    for i in range(a.steps):
        idx = torch.randint(0, cfg.vocab_size, (BATCH, case.seq + 1), generator=gen)
        idx = idx.to(mem.device)  # drawn on the CPU: the same tokens on every device
        mem.trim()
        before = mem.current()
        mem.reset()
        if meter:
            meter.start()
        svds0, svd_s0 = counter.count, counter.seconds
        merges0 = sum(int(x.merges) for x in loqt_layers)
        t = time.perf_counter()
        loss = model(idx[:, :-1], idx[:, 1:])
        mem.sync()
        t_fwd = time.perf_counter() - t
        loss.backward()
        if not m.per_layer:
            opt.step()
        opt.zero_grad(set_to_none=True)
        mem.sync()
        dt = time.perf_counter() - t
        upd = meter.summary() if meter else None
        peak = max(upd["outside"], upd["during"]) if upd else mem.peak()
        svds, svd_s = counter.count - svds0, counter.seconds - svd_s0
        merges = sum(int(x.merges) for x in loqt_layers) - merges0
        kind = ("merge" if merges else "ordinary") if loqt_layers else \
            ("SVD" if svds else "ordinary")
        steps.append(dict(step=i, kind=kind, peak=peak, rss_before=before,
                          rss_after=mem.current(), seconds=dt, forward_s=t_fwd, svd_s=svd_s,
                          svds=svds, merges=merges, loss=float(loss), updates=upd))
        if mem.cuda:  # rss_before / rss_after are then memory_allocated
            steps[-1]["reserved"] = mem.reserved()
        log(f"{case.key}: step {i} ({kind}, {svds} SVDs, {merges} merges) {dt:.0f} s "
            f"(SVD {svd_s:.0f} s), loss {float(loss):.4f}, peak {peak / GB:.2f} GB")
        del loss
        if i + 1 < a.steps:  # what was measured so far survives a kill or a timeout
            print("PARTIAL " + json.dumps(result()), flush=True)
    return result()


def estimate(case: Case, rank: int, a) -> dict:
    """A lower bound of the peak from a meta count (weights, gradients) and the closed form
    (state), bf16, without the rotary table."""
    cfg = C.get_config(case.config, vocab_size=VOCAB, seq_len=case.seq)
    with torch.device("meta"):
        model = C.LlamaLM(cfg)
    model.to(torch.bfloat16)
    shapes = C.matrix_shapes(model, ("attn", "mlp"))
    swap(model, case.method, rank, a)
    w = weights_of(model)
    w["total"] -= w.pop("rope")
    m = method(case.method)
    return dict(weights=w, state=C.closed_form(m.optimizer_class, shapes, rank, 2)[1],
                grads=C.grad_bytes(model, m.per_layer),
                n_params=sum(p.numel() for p in model.parameters()))


# ---- the parent: run the cases, guard memory, write the table -----------------------------
def run_case(case: Case, a, argv: list) -> dict:
    """One child process (``--one``); killed past ``--timeout`` or, on the CPU, past
    ``--max-rss-gb`` or below ``--min-free-gb`` free on the machine."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", case.key]
    log(f"running {shlex.join(cmd)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fout:
        proc = subprocess.Popen(cmd, stdout=fout, cwd=ROOT)
        max_seen, stop = 0, None
        while proc.poll() is None and not stop:
            rss = (C.proc_kb("VmRSS", f"/proc/{proc.pid}/status") or 0) * 1024
            avail = (C.proc_kb("MemAvailable", "/proc/meminfo") or 0) * 1024
            max_seen = max(max_seen, rss)
            if a.device == "cpu" and rss > a.max_rss_gb * GB:
                stop = f"RSS {rss / GB:.2f} GB passed --max-rss-gb {a.max_rss_gb}"
            elif a.device == "cpu" and avail < a.min_free_gb * GB:
                stop = (f"machine MemAvailable {avail / GB:.2f} GB fell below --min-free-gb "
                        f"{a.min_free_gb} (child RSS {rss / GB:.2f} GB)")
            elif time.perf_counter() - t0 > a.timeout:
                stop = f"timeout {a.timeout} s"
            if stop:
                proc.kill()
            time.sleep(0.2)
        proc.wait()
        fout.seek(0)
        lines = fout.read().splitlines()
    wall = time.perf_counter() - t0
    got = {tag: [json.loads(ln[len(tag) + 1:]) for ln in lines if ln.startswith(tag + " ")]
           for tag in ("RESULT", "PARTIAL", "ERROR")}
    if got["ERROR"] and not stop:
        stop = f"exit code {proc.returncode}: {got['ERROR'][-1]}"
    why = stop or f"exit code {proc.returncode}"
    if got["RESULT"] and not stop and proc.returncode == 0:
        res = got["RESULT"][-1]
    elif got["PARTIAL"]:
        res = got["PARTIAL"][-1]
        res["incomplete"] = f"stopped after step {res['steps'][-1]['step']}: {why}"
        log(f"{case.key}: {res['incomplete']}")
    else:
        log(f"{case.key}: NOT MEASURED ({why}); max RSS seen {max_seen / GB:.2f} GB")
        res = dict(case=asdict(case), key=case.key, method=case.method, error=why)
    return dict(res, max_rss_seen=max_seen, wall=wall)


def gb(n) -> str:
    return "–" if n is None else f"{n / GB:.2f}"


def bound(r: dict, cuda: bool) -> int:
    e = r["estimate"]
    return e["weights"]["total"] + e["state"] + e["grads"] + (
        (r.get("runtime") or 0) if cuda else RUNTIME)


def render(rows: list, meta: dict, device: str = "cpu", path: str = "") -> str:
    """The results file (rows of older revisions too): targets, per step, per process, the
    meta-count bound, the rows as JSON for ``--merge``."""
    cuda = device == "cuda"
    what = "allocated" if cuda else "RSS"
    ok = [r for r in rows if "error" not in r]
    targets = []
    for r in rows:
        t = TARGET_GB.get((family(r["method"]), r["case"]["config"], method(r["method"]).per_layer))
        if t and "error" in r:
            lb = f"; lower bound (weights + state + grads + runtime) {gb(bound(r, cuda))}" \
                if r.get("estimate") else ""
            targets.append([t[1], f"`{r['key']}`", f"not measured: {r['error']}{lb}", "–", "–"])
        elif t:
            second = r.get("reserved") if cuda else max(
                (s["updates"]["outside"] for s in r["steps"] if s.get("updates")), default=None)
            note = f" ({r['incomplete']})" if r.get("incomplete") else ""
            targets.append([t[1], f"`{r['key']}`{note}",
                            f"{gb(r['peak'])} ({r['peak'] / GIB:.2f})", gb(second),
                            "**met**" if r["peak"] < t[0] * GB else "**not met**"])
    split = ["peak reserved GB"] if cuda else ["outside GB", "largest update GB"]
    per_step = []
    for r in rows:
        c = r["case"]
        head = [r["method"], c["config"], c["seq"], "yes" if c["ckpt"] else "no",
                "per-layer" if method(r["method"]).per_layer else "opt.step()"]
        if "error" in r:
            per_step.append(head + ["–", f"not measured: {r['error']} (max "
                                    f"{'host ' if cuda else ''}RSS seen {gb(r['max_rss_seen'])})"]
                            + [""] * (8 + len(split)))
        for s in r.get("steps", []):
            u = s.get("updates") or {}
            t = u.get("largest_transient")
            merges = f", {s['merges']} merges" if s["merges"] else ""
            per_step.append(head + [s["step"], f"{s['kind']} ({s['svds']} SVDs{merges})",
                                    f"**{gb(s['peak'])}**"]
                            + ([gb(s.get("reserved"))] if cuda else [
                                gb(u["outside"]) if u else "–",
                                f"{gb(t['transient'])} ({t['numel'] / 1e6:.0f}M)" if t else "–"])
                            + [gb(s["rss_before"]), gb(r["weights"]["total"]),
                               gb(r["state"]["total"]), gb(r["grads"]), f"{s['seconds']:.1f}",
                               f"{s['svd_s']:.1f}", f"{s['loss']:.3f}"])
    per_process = [[f"`{r['key']}`", r["rank"], f"{r['n_params'] / 1e9:.3f} B", gb(r["runtime"]),
                    gb(r["build_peak"])] + ([gb(r.get("build_reserved"))] if cuda else [])
                   + [f"{r['build_s']:.0f}", f"{gb(r['peak'])} ({r['peak'] / GIB:.2f})"]
                   + ([gb(r.get("reserved"))] if cuda else [])
                   + [gb(r["weights"][k]) for k in ("codes", "scales", "float_params")]
                   + [gb(r["state"]["basis"]), f"{r['wall']:.0f}"] for r in ok]
    bounds = [[f"`{r['key']}`" + (" (not run)" if r.get("estimate_only") else "")]
              + [gb(x) for x in (r["estimate"]["weights"]["total"], r["estimate"]["state"],
                                 r["estimate"]["grads"], bound(r, cuda), r.get("peak"))]
              + [gb(None if r.get("peak") is None else r["peak"] - bound(r, cuda))]
              for r in rows if r.get("estimate")]
    per_el = [t["transient"] / t["numel"] for r in ok for s in r["steps"]
              if (t := (s.get("updates") or {}).get("largest_transient"))]
    notes = ["- The 8-bit Adam updates run bitsandbytes' fused CUDA kernel in place; "
             "`lowrank_optim.functional.adam8bit_` adds its float32 direction of the tensor's "
             "size." if cuda else
             "- **The 8-bit Adam update of a large tensor costs about " + (
                 f"{min(per_el):.0f}–{max(per_el):.0f}" if per_el else "30")
             + " bytes per element of transient memory on the CPU** (column *largest update*; "
             "the tensor is the embedding or the head, 32000 × d; why: docs/benchmarks.md).",
             "- *Time-only settings* (SVD power iterations, LoQT's `ec_iters`) change no tensor "
             "that is kept.",
             "- A row marked *incomplete* was stopped (timeout, guard) after the steps listed; "
             "what those steps measured is kept."]
    body = "\n\n".join([
        "What the columns mean: docs/benchmarks.md, section bench_peak.py.",
        "## Targets", C.md_table(["issue target", "row", f"peak {what} GB (GiB)",
                                  "peak reserved GB" if cuda else "outside GB", "met"], targets),
        "## Per step", C.md_table(["method", "config", "seq", "checkpointing", "mode", "step",
                                   "kind", f"peak {what} GB"] + split
                                  + [f"{what} before GB", "weights GB", "state GB", "grads GB",
                                     "step s", "SVD s", "loss"], per_step),
        "## Per process", C.md_table(
            ["row", "rank", "parameters", "allocated before the build GB" if cuda
             else "runtime GB", "build peak GB"] + (["build reserved GB"] if cuda else [])
            + ["build s", "process peak GB (GiB)"] + (["process reserved GB"] if cuda else [])
            + ["codes GB", "scales GB", "float params GB", "basis in state GB", "wall s"],
            per_process),
        "## Notes", "\n".join(notes),
        "## Lower bound from a meta count", C.md_table(
            ["row", "weights GB", "state GB", "grads GB", "bound GB", "measured peak GB",
             "measured − bound GB"], bounds),
        "Methods (this script's name, the `common.METHODS` entry): " + "; ".join(
            f"`{n}` (`{METHODS[n]}`): {method(n).description}" for n in METHODS
            if any(r["method"] == n for r in rows)) + ".",
        "<!-- bench_peak rows (JSON, read by --merge):\n"
        + "\n".join(json.dumps(r, sort_keys=True) for r in rows) + "\n-->"])
    title = (f"bench_peak: peak {'GPU memory' if cuda else 'memory'} of one real training step "
             f"(LLaMA 7B / 13B on {'CUDA' if cuda else 'the CPU'})")
    return C.write_report(path, title, meta, body)


def select_cases(a) -> list:
    """``--cases``, else each of ``--methods`` on each of ``--configs``, else the default
    cases of ``--methods``; ``--seq`` for all."""
    methods = a.methods.split(",") if a.methods else ISSUE_METHODS
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    chosen = [Case.parse(c) for c in a.cases.split(",") if c.strip()] if a.cases else \
        [Case.parse(f"{m}:{c}") for c in a.configs.split(",") for m in methods] if a.configs \
        else [c for c in map(Case.parse, CASES.split(",")) if c.method in methods]
    for c in chosen:
        c.seq = a.seq or c.seq
    return chosen


def parse_args(argv=None):
    """The options (docs/benchmarks.md); ``--one CASE``: the child that measures CASE."""
    a = C.parser(__doc__, cases="", configs="", methods="", seq=0,
                 threads=1, steps=2, rank=0, svd="randomized", svd_niter=0, ec_iters=-1,
                 device="cpu", timeout=5400.0, jobs=0, max_rss_gb=21.5, min_free_gb=0.6,
                 out="", merge=False, estimate_only="", one="").parse_args(argv)
    a.ec_iters = a.ec_iters if a.ec_iters >= 0 else 5 if a.device == "cuda" else 1
    a.svd_niter = None if a.svd_niter < 0 else a.svd_niter
    a.out = a.out or OUT[a.device]
    return a


def header(rows: list, a, t0: float, load0: float) -> dict:
    env = next((r["env"] for r in reversed(rows) if r.get("env")), {})  # cuda: the child's
    host = (f"{C.cpu_name()}, {os.cpu_count()} CPUs, "
            f"{(C.proc_kb('MemTotal', '/proc/meminfo') or 0) / 2 ** 20:.1f} GiB RAM")
    gpu = f"{env['gpu']} ({env['gpu_memory'] / GIB:.1f} GiB, compute capability " \
          f"{env['capability']}, CUDA {env['cuda']})" if env else "?"
    return {
        "command(s)": "; ".join(f"`{c}` ({d})" for c, d in {
            r.get("command", "(not recorded)"): r.get("date", "?") for r in rows}.items()),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        + f" (this invocation: {time.time() - t0:.0f} s; each row's date is beside its command)",
        "versions": env.get("versions") or C.versions(),
        "device": f"cuda: {gpu}; host {host}, {a.threads} torch CPU thread(s)"
        if a.device == "cuda" else f"cpu ({host}), {a.threads} torch thread(s), no GPU; load "
        f"average {load0:.2f} / {os.getloadavg()[0]:.2f} at the start / end of the last "
        "invocation (a shared machine)",
        "settings": f"vocabulary {VOCAB}, batch {BATCH}, bf16; svd={a.svd}, randomized-SVD power "
                    f"iterations {'package default (1)' if a.svd_niter is None else a.svd_niter}"
                    f", LoQT ec_iters={a.ec_iters} (package default 5), LoQT update_proj_gap 100 "
                    "(step 0 merges), scale 0.5; Q-GaLore update_proj_gap 500, scale 0.25, lr "
                    "0.004; APOLLO-Mini update_proj_gap 200, rank 1, scale √128, lr 0.01"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.one:
        try:
            res = run_one(Case.parse(a.one), a)
        except BaseException as e:  # the reason, for the parent's table (e.g. CUDA OOM)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print("ERROR " + json.dumps(f"{type(e).__name__}: {first}"), flush=True)
            raise
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    chosen = select_cases(a)
    t0, load0 = time.time(), os.getloadavg()[0]
    command = shlex.join(["python", "benchmarks/bench_peak.py", *argv])
    text = (ROOT / a.out).read_text() if a.merge and (ROOT / a.out).exists() else ""
    m = re.search(r"<!-- bench_peak rows \(JSON, read by --merge\):\n(.*?)\n-->", text, re.S)
    old = [json.loads(ln) for ln in m.group(1).splitlines() if ln.strip()] if m else []
    if any(r.get("device", "cpu") != a.device for r in old):  # RSS and CUDA peaks differ
        log(f"dropping the rows of another device than {a.device}")
        old = [r for r in old if r.get("device", "cpu") == a.device]
    ests = [estimate(c, c.rank(a), a) for c in chosen]
    # small cases (the smoke test) two at a time; anything big strictly one at a time
    jobs = a.jobs or (2 if max(e["weights"]["total"] + e["state"] + e["grads"]
                               for e in ests) < SMALL_BOUND else 1)
    rows = []

    def one(i: int) -> dict:
        case = chosen[i]
        row = (dict(case=asdict(case), key=case.key, method=case.method, max_rss_seen=None,
                    error=f"not run: {a.estimate_only}", estimate_only=True)
               if a.estimate_only else run_case(case, a, argv))
        return dict(row, estimate=ests[i], command=command, git=C.git_rev(),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"))

    with ThreadPoolExecutor(jobs) as pool:
        for row in pool.map(one, range(len(chosen))):  # the file rewritten after each row
            rows.append(row)
            keys = {x["key"] for x in rows}
            allrows = [r for r in old if r["key"] not in keys] + rows
            text = render(allrows, header(allrows, a, t0, load0), a.device, a.out)
    log(f"wrote {a.out}")
    print(text)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
