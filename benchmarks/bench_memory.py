"""Bytes of weights and optimizer state per method at the papers' LLaMA sizes after one step,
counted on real (``--real``) and meta tensors, against the closed forms (docs/benchmarks.md).

    python benchmarks/bench_memory.py --svd randomized --threads 1   # memory.md (6-10 min)
    python benchmarks/bench_memory.py --real ""                      # meta only (seconds)
    python benchmarks/bench_memory.py --ranks 1b=1024 --dtype float32 --out /tmp/m.md
"""
from __future__ import annotations

import gc, math, sys, time

import _paths  # noqa: F401  (puts the checkout first on sys.path)

import torch
from torch import nn

import common as C
import lowrank_optim as lo
from common import LlamaLM, get_config, stored_tensors

GB = 1e9
TARGETS = ("attn", "mlp")
RANKS = "60m=128,130m=256,350m=256,1b=512,7b=1024"   # the papers' ranks
UPDATE_PROJ_GAP = 200
SVD = "exact"  # irrelevant to the bytes; --svd randomized makes the real runs faster
# this script's names (the optimizer classes) -> common.METHODS entries
REGISTRY = {"AdamW": "adamw", "AdamW8bit": "adamw8bit", "GaLoreAdamW": "galore",
            "GaLoreAdamW8bit": "galore8bit", "QGaLoreAdamW8bit": "qgalore", "LoQTAdamW": "loqt",
            "LoQTAdamW8bit": "loqt8bit"}
LOWRANK = tuple(REGISTRY)[2:]   # the package's optimizers
LOQT = C.LOQT
SIZES = ("60m", "130m", "350m", "1b")
# published weights + optimizer states (GB): GaLore paper Table 2 (= Q-GaLore Table 1),
# Q-GaLore Table 1, LoQT v1 Table 1; and GaLore Table 6's split (weights, states)
PUBLISHED = {"Full": dict(zip(SIZES, (0.36, 0.76, 2.06, 7.80))),
             "GaLore": dict(zip(SIZES, (0.24, 0.52, 1.22, 4.38))),
             "Q-GaLore": dict(zip(SIZES, (0.18, 0.39, 0.88, 3.08))),
             "LoQT": dict(zip(SIZES, (0.23, 0.49, 0.98, 3.16)))}
PUBLISHED_SPLIT = {
    "Full": dict(zip(SIZES, ((0.12, 0.23), (0.25, 0.51), (0.68, 1.37), (2.60, 5.20)))),
    "GaLore": dict(zip(SIZES, ((0.12, 0.13), (0.25, 0.28), (0.68, 0.54), (2.60, 1.78))))}


def _args(rank: int) -> C.MethodArgs:
    return C.MethodArgs(lr=1e-3, rank=rank, update_proj_gap=UPDATE_PROJ_GAP, scale=0.25)


def build_model(cfg, dt: torch.dtype, device: str, method: str, rank: int) -> nn.Module:
    """LlamaLM in ``dt`` on ``device`` with the registry's swap of ``method`` (INT8
    ``QuantLinear`` for Q-GaLore, ``LoQTLinear`` for LoQT, quantized from ``dt`` weights)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaLM(cfg).to(dt)  # built in float32, then in dt (the rotary table too)
    return C.METHODS[REGISTRY[method]].swap(model, _args(rank))


@torch.no_grad()
def meta_init(opt: lo.LowRankOptimizer) -> None:
    """The state tensors a real first step creates: ``step_param``'s lazy init without
    ``rule.update`` and ``_apply`` (they write into existing tensors; meta has no generator)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            state["step"] = 0
            if opt.is_projected(p, group):
                opt._refresh(p, opt._grad(p, group), group, state, opt._projector(group),
                             opt._refresh_policy(p, group))
            else:
                opt.rule.init(state, p, group)
            state["step"] = 1


def count(model: nn.Module, opt) -> dict:
    """Bytes by category, each tensor once; ``held_*``: of the distinct storages behind them."""
    out = dict(w_float=0, w_int=0, w_scales=0, w_buffers=0, s_moments=0, s_basis=0, s_other=0,
               held_weights=0, held_state=0)
    seen, storages = set(), set()

    def add(cat, t):
        key = (C.storage_id(t), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            out[cat] += t.numel() * t.element_size()
        if C.storage_id(t) not in storages:
            storages.add(C.storage_id(t))
            out["held_" + ("weights" if cat.startswith("w_") else "state")] += \
                t.untyped_storage().nbytes()

    for name, kind, t in stored_tensors(model):  # LoQT: NF4 codes of Q, INT8 codes of P
        add("w_float" if kind == "p" and t.is_floating_point() else "w_int" if kind == "p"
            or name.endswith("_codes") else "w_scales" if name.endswith(("_scale", "_offset"))
            else "w_buffers", t)
    for key, t in C.state_tensors(opt):
        add("s_basis" if key.startswith("proj") else "s_other"
            if key.startswith("qmap") or key == "step" else "s_moments", t)
    out["weights"] = out["w_float"] + out["w_int"] + out["w_scales"] + out["w_buffers"]
    out["state"] = out["s_moments"] + out["s_basis"] + out["s_other"]
    out["total"] = out["weights"] + out["state"]
    out["views_ok"] = (out["held_weights"], out["held_state"]) == (out["weights"], out["state"])
    out["n_state_tensors"] = sum(1 for _ in C.state_tensors(opt))
    return out


def measure(method: str, cfg, rank: int, dt: torch.dtype, device: str) -> dict:
    """Build, a random gradient on every parameter, one step (or :func:`meta_init`), count."""
    t0 = time.perf_counter()
    model = build_model(cfg, dt, device, method, rank)
    opt = C.METHODS[REGISTRY[method]].optimizer(
        model, _args(rank), **({"svd": SVD} if method in LOWRANK and method not in LOQT else {}))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, dtype=p.dtype, device=p.device)
    if device == "meta" and method in LOWRANK:
        meta_init(opt)
    else:
        opt.step()
    model.zero_grad(set_to_none=True)
    opt.zero_grad()
    res = dict(count(model, opt), seconds=time.perf_counter() - t0)
    del model, opt
    gc.collect()
    return res


# ---- closed forms -------------------------------------------------------------------------
def shapes_of(cfg) -> list[tuple[str, tuple, bool]]:
    """(name, shape, projected) of every parameter of LlamaLM(cfg), from a meta model."""
    with torch.device("meta"):
        return C.matrix_shapes(LlamaLM(cfg), TARGETS)


def rope_bytes(cfg, esize: int) -> int:
    return 2 * cfg.seq_len * (cfg.dim // cfg.n_heads // 2) * esize


def closed_form_package(method: str, cfg, rank: int, esize: int) -> tuple[int, int]:
    """``common.closed_form`` for LlamaLM(cfg), the rotary table included."""
    w, s = C.closed_form(method, shapes_of(cfg), rank, esize)
    return w + rope_bytes(cfg, esize), s


def closed_form_papers(method: str, cfg, rank: int) -> tuple[float, float]:
    """The papers' BF16 estimate (weights, state): 2 bytes per element unless quantized, no
    quantization scales (the formulas: docs/benchmarks.md)."""
    w = s = 0.0
    for _, shape, proj in shapes_of(cfg):
        n, r = math.prod(shape), min(rank, *shape)
        low, basis = 2 * max(shape) * r, min(shape) * r             # 2 moments, 1 basis
        if method in LOQT:                                          # NF4 Q, NF4 P, BF16 B
            w += 0.5 * n + 0.5 * min(shape) * r + 2.0 * max(shape) * r if proj else 2.0 * n
            s += (2.0 if method == "LoQTAdamW" else 1.0) * (low if proj else 2 * n)
            continue
        w += 1.0 * n if (method == "QGaLoreAdamW8bit" and proj) else 2.0 * n
        if method == "AdamW":
            s += 4.0 * n
        elif method == "AdamW8bit" or not proj:
            s += 4.0 * n if method == "GaLoreAdamW" else 2.0 * n
        else:
            s += {"GaLoreAdamW": 2.0 * (low + basis), "GaLoreAdamW8bit": low + 2.0 * basis,
                  "QGaLoreAdamW8bit": low + 0.5 * basis}[method]
    return w, s


def row(m: str, cfg, rank: int, dt: torch.dtype, real: bool) -> dict:
    """One method and config: the meta (and ``real`` CPU) count and both closed forms."""
    meta = measure(m, cfg, rank, dt, "meta")
    real = measure(m, cfg, rank, dt, "cpu") if real else None
    esize = torch.empty((), dtype=dt).element_size()
    x, pkg = real or meta, closed_form_package(m, cfg, rank, esize)
    return dict(rank=rank, x=x, meta=meta, real=real, pkg=pkg, pap=closed_form_papers(m, cfg, rank),
                pkg_ok=(x["weights"], x["state"]) == pkg,
                same=not real or all(real[k] == meta[k] for k in meta if k != "seconds"))


# ---- the report ---------------------------------------------------------------------------
def gb(x) -> str:
    return "–" if x is None else f"{x / GB:.3f}"


def names_of(s: str) -> list:
    return [c.strip().lower().removeprefix("llama_") for c in s.split(",") if c.strip()]


def parse_ranks(s: str) -> dict:
    return {k: int(v) for k, _, v in (x.partition("=") for x in names_of(s))}


# the papers table: (label, what, method or paper); what: "pub" (published), "papers" (BF16
# closed form), "package" (closed form), "measured", or a paper (measured / its figure)
PAPER_ROWS = [
    ("Full-rank, published", "pub", "Full"),
    ("Full-rank (AdamW), BF16 closed form", "papers", "AdamW"),
    ("AdamW measured", "measured", "AdamW"), ("AdamW8bit measured", "measured", "AdamW8bit"),
    ("GaLore, published", "pub", "GaLore"), ("GaLore, BF16 closed form", "papers", "GaLoreAdamW"),
    ("GaLoreAdamW measured (float32 low-rank moments and basis)", "measured", "GaLoreAdamW"),
    ("GaLoreAdamW8bit measured", "measured", "GaLoreAdamW8bit"),
    ("Q-GaLore, published", "pub", "Q-GaLore"),
    ("Q-GaLore, BF16 closed form (no scales)", "papers", "QGaLoreAdamW8bit"),
    ("Q-GaLore, package closed form (with scales)", "package", "QGaLoreAdamW8bit"),
    ("**QGaLoreAdamW8bit measured**", "measured", "QGaLoreAdamW8bit"),
    ("LoQT, published", "pub", "LoQT"),
    ("LoQT, BF16 closed form (no scales)", "papers", "LoQTAdamW"),
    ("**LoQTAdamW measured**", "measured", "LoQTAdamW"),
    ("LoQTAdamW8bit, BF16 closed form (8-bit moments)", "papers", "LoQTAdamW8bit"),
    ("**LoQTAdamW8bit measured**", "measured", "LoQTAdamW8bit"),
    ("QGaLoreAdamW8bit measured / Q-GaLore published (target ≤ 1)", "Q-GaLore",
     "QGaLoreAdamW8bit"),
    ("LoQTAdamW measured / LoQT published (target at 1B: ≤ 1)", "LoQT", "LoQTAdamW"),
    ("LoQTAdamW8bit measured / LoQT published (target at 1B: ≤ 1)", "LoQT", "LoQTAdamW8bit")]


def paper_cell(rows: dict, c: str, label: str, what: str, key: str) -> str:
    r, p = rows.get((c, key)), PUBLISHED.get(key if what == "pub" else what, {}).get(c)
    if what == "pub":
        return "–" if p is None else f"{p:.2f}"
    if r is None or (what in PUBLISHED and p is None):
        return "–"
    if what in PUBLISHED:
        t = r["x"]["total"] / GB
        return f"{t / p:.3f} {'≤ 1 ✓' if t <= p else '> 1 ✗'}"
    v = gb({"measured": r["x"]["total"], "papers": sum(r["pap"]), "package": sum(r["pkg"])}[what])
    return f"**{v}**" if label.startswith("**") else v


def papers_table(rows: dict, names: list, alt) -> str:
    text = C.md_table([""] + names, [[label] + [paper_cell(rows, c, label, what, key)
                                                for c in names] for label, what, key in PAPER_ROWS])
    if alt is not None:
        p, x = PUBLISHED["Q-GaLore"]["1b"], alt["x"]
        text += (f"\n\n1B at rank 1024 (the rank of Q-GaLore's 1B pretraining script) instead "
                 f"of Table 1's 512: BF16 closed form {gb(sum(alt['pap']))} GB, "
                 f"QGaLoreAdamW8bit measured (meta) {gb(x['total'])} GB (weights "
                 f"{gb(x['weights'])}, state {gb(x['state'])}; "
                 f"{'=' if alt['pkg_ok'] else '≠'} package closed form), "
                 f"{x['total'] / GB / p:.3f}× the published {p:.2f} GB.")
    split = lambda c, m: "/".join(gb(v) for v in rows[c, m]["pap"]) if (c, m) in rows else "–"
    pub_split = lambda k, c: "/".join(f"{v:.2f}" for v in PUBLISHED_SPLIT[k][c]) \
        if c in SIZES else "–"
    return text + "\n\nWeights / states, GB: published (GaLore paper Table 6) and the BF16 " \
        "closed form.\n\n" + C.md_table(
            ["config", "Full, published", "Full, BF16 closed form", "GaLore, published",
             "GaLore, BF16 closed form", "Q-GaLore, BF16 closed form"],
            [[c, pub_split("Full", c), split(c, "AdamW"), pub_split("GaLore", c),
              split(c, "GaLoreAdamW"), split(c, "QGaLoreAdamW8bit")] for c in names])


def render(rows: dict, fp32: dict, alt, names, meths) -> str:
    adamw = {c: r["x"]["total"] for (c, m), r in rows.items() if m == "AdamW"}
    yes = lambda ok: "yes" if ok else "NO"
    measured = [[c, m, r["rank"] if m in LOWRANK else "–", gb(x["weights"]),
                 gb(x["w_int"] + x["w_scales"]) if x["w_int"] else "–", gb(x["state"]),
                 gb(x["s_basis"]) if x["s_basis"] else "–", f"**{gb(x['total'])}**",
                 f"{x['total'] / adamw[c]:.3f}" if c in adamw else "–",
                 "real" if r["real"] else "meta", yes(r["pkg_ok"]),
                 "yes" if x["views_ok"] else "NO: held " + gb(x["held_weights"] + x["held_state"])]
                for (c, m), r in rows.items() for x in [r["x"]]]
    mb = lambda v: f"{v / 1e6:.2f}"
    breakdown = [[c, m] + [mb(r["x"][k]) for k in ("w_float", "w_int", "w_scales", "w_buffers",
                                                   "s_moments", "s_basis")]
                 + [r["x"]["s_other"], r["x"]["n_state_tensors"]] for (c, m), r in rows.items()]
    parts = [
        "## Measured: what the package really allocates",
        "*count*: `real` = one real step on the CPU (the meta count equal byte for byte), `meta` "
        "= meta device only. *= closed form*: equal to the package closed form. *storages = "
        "tensors*: no tensor is a view pinning a larger buffer.",
        C.md_table(["config", "method", "rank", "weights GB", "of which quantized codes + scales",
                    "state GB", "of which basis", "weights + state GB", "× AdamW", "count",
                    "= closed form", "storages = tensors"], measured),
        "## Against the papers (weights + optimizer state, GB)",
        "*published*: GaLore paper Table 2 (Full, GaLore; the same in Q-GaLore's Table 1), "
        "Q-GaLore paper Table 1, LoQT v1 Table 1. 7B has no published weights + state figure.",
        papers_table(rows, names, alt),
        "## Breakdown (MB = 10^6 bytes)",
        C.md_table(["config", "method", "float params", "INT8 codes", "INT8 scales+offsets",
                    "other buffers", "moments", "basis",
                    "other state, bytes (step tensors, qmaps)", "state tensors"], breakdown)]
    if fp32:
        parts += ["## The same with float32 weights (meta count; weights + state, GB)",
                  C.md_table(["config"] + meths + ["all = closed form"], [
                      [c] + [gb(fp32[c, m]["x"]["total"]) for m in meths]
                      + [yes(all(fp32[c, m]["pkg_ok"] for m in meths))] for c in names])]
    checks = [[c, m, r["real"]["weights"], r["meta"]["weights"], r["real"]["state"],
               r["meta"]["state"], yes(r["same"]), f"{r['real']['seconds']:.1f}"]
              for (c, m), r in rows.items() if r["real"]]
    if checks:
        parts += ["## Meta count against the real run (bytes)",
                  C.md_table(["config", "method", "weights real", "weights meta", "state real",
                              "state meta", "equal", "real-run seconds"], checks)]
    return "\n\n".join(parts)


def main(argv=None) -> int:
    global SVD
    ap = C.parser(__doc__, configs="60m,130m,350m,1b,7b", ranks="", real="60m,130m,350m",
                  methods=",".join(REGISTRY), vocab=32000, dtype="bfloat16", svd=SVD, threads=1,
                  out="benchmarks/results/memory.md")
    a = ap.parse_args(argv)
    SVD = a.svd
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    esize = torch.empty((), dtype=dt).element_size()
    rank_of = {**parse_ranks(RANKS), **parse_ranks(a.ranks)}
    names, real_set = names_of(a.configs), set(names_of(a.real))
    meths = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in meths:
        if m not in REGISTRY:
            ap.error(f"unknown method {m!r}; choose from {', '.join(REGISTRY)}")
    for c in names:
        if c not in rank_of:
            ap.error(f"no rank for config {c!r}: pass --ranks {c}=R")
    t_start = time.time()
    rows, fp32 = {}, {}
    for c in names:
        cfg, rank = get_config(c, vocab_size=a.vocab), rank_of[c]
        for m in meths:
            r = rows[c, m] = row(m, cfg, rank, dt, c in real_set)
            print(f"{c:>5} {m:<17} r={rank:<5} weights {gb(r['x']['weights'])} GB  state "
                  f"{gb(r['x']['state'])} GB  [{'real+meta' if r['real'] else 'meta'}; closed form "
                  f"{'equal' if r['pkg_ok'] else 'DIFFERS'}; {r['x']['seconds']:.1f} s]",
                  flush=True)
            if dt != torch.float32:  # and with float32 weights, on meta
                fp32[c, m] = row(m, cfg, rank, torch.float32, False)
    alt = None  # Q-GaLore's 1B *script* rank (1024), next to Table 1's 512
    if "1b" in names and rank_of["1b"] != 1024 and "QGaLoreAdamW8bit" in meths:
        alt = row("QGaLoreAdamW8bit", get_config("1b", vocab_size=a.vocab), 1024, dt, False)
    meta = C.report_meta("bench_memory.py", argv, f"{C.device_name('cpu')} for the real runs "
                         f"({', '.join(c for c in names if c in real_set) or 'none'}); `meta` "
                         "for all")
    meta["date"] += f"; total time {time.time() - t_start:.0f} s"
    meta.update({
        "model": f"`benchmarks/common.py` LlamaLM, vocabulary {a.vocab}, weights in {dt}; ranks "
                 + ", ".join(f"{c} {rank_of[c]}" for c in names) + f"; update_proj_gap "
                 f"{UPDATE_PROJ_GAP}, scale 0.25; projected = attention and MLP matrices; svd "
                 f"{a.svd}",
        "counted": "GB = 10^9 bytes; **weights** = parameters + buffers (quantization scales, "
                   "the rotary table: " + ", ".join(
                       f"{c} {rope_bytes(get_config(c), esize) / 1e3:.1f} kB" for c in names)
                   + "), **state** = every tensor in `optimizer.state` (shared ones once); what "
                     "the methods store and how the meta counts are made: docs/benchmarks.md"})
    print(C.write_report(a.out, "bench_memory: bytes of weights and optimizer state", meta,
                         render(rows, fp32, alt, names, meths)))
    ok = [r["pkg_ok"] for r in list(rows.values()) + list(fp32.values()) + [alt] if r] + \
        [r["x"]["views_ok"] and r["same"] for r in rows.values()]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
