"""Bytes of weights and optimizer state, per method, for the papers' LLaMA sizes.

For each LLaMA config (60m, 130m, 350m, 1b, 7b of ``benchmarks/common.py``, vocabulary
32000 as in the papers) and each method

* ``AdamW``            ``torch.optim.AdamW``
* ``AdamW8bit``        ``bitsandbytes.optim.AdamW8bit``
* ``GaLoreAdamW``      ``lowrank_optim.GaLoreAdamW``       (attention + MLP matrices projected)
* ``GaLoreAdamW8bit``  ``lowrank_optim.GaLoreAdamW8bit``   (same, 8-bit moments)
* ``QGaLoreAdamW8bit`` ``lowrank_optim.QGaLoreAdamW8bit``  on a model whose attention and MLP
  Linears were swapped by ``lowrank_optim.quantize_weights`` (INT8 codes, groups of 256),
  INT4 packed bases (groups of 256), 8-bit moments; embedding, norms and head stay in
  the model dtype with 8-bit moments where bitsandbytes would use them (>= 4096 elements)

this script COUNTS THE BYTES OF THE REAL TENSORS: it builds the model (in ``--dtype``,
bfloat16 by default, the papers' convention for weights), quantizes it with the package
where the method asks for it, sets a gradient on every parameter (random; INT8 weights too,
float32, for the INT8 weights, as ``QuantLinear``'s backward leaves it), takes ONE optimizer
step, then sums ``numel * element_size`` over ``model.parameters()`` + ``model.buffers()``
(weights; the buffers are the INT8 layers' float32 scales/offsets and the rotary table)
and over every tensor reachable from ``optimizer.state`` (state; a tensor shared between
parameters, bitsandbytes' two 256-entry quantization maps, counted once). GB = 10^9 bytes
(the papers' unit).

Configs listed in ``--real`` run on the CPU for real; every config also runs on the
``meta`` device (shapes and dtypes only, no memory), and where both ran the two counts
must be equal byte for byte (the script checks it and says so). On meta:

* ``torch.optim.AdamW`` and ``bitsandbytes.optim.AdamW8bit`` take their ordinary
  ``step()``: torch's kernels and bitsandbytes' registered CPU op both accept meta tensors,
  and the state is created by each optimizer's own lazy init (``_init_group`` /
  ``init_state``).
* The package's optimizers are initialised through ``LowRankOptimizer.step_param``'s own
  lazy-init calls, in the same order, with the inner update and the weight write skipped:
  ``state["step"] = 0``; for a projected matrix ``opt._refresh(p, g, group, state,
  opt._projector(group), opt._refresh_policy(p, group))`` (a meta SVD through
  ``Projector.refresh`` -> ``compute_basis``, the basis stored by ``Projector._store``,
  quantized by ``quant.quantize`` for Q-GaLore; then ``opt.rule.init`` on the low-rank
  shape, i.e. ``functional.init_adam8bit`` for 8-bit moments); for a plain parameter
  ``opt.rule.init(state, p, group)``; then ``state["step"] = 1``. What is skipped,
  ``opt.rule.update`` (bitsandbytes' 8-bit kernel) and ``_apply`` (the weight update; for an INT8
  weight ``QGaLoreAdamW8bit`` builds a ``torch.Generator`` on the weight's device for
  stochastic rounding, which the meta device refuses), only writes into tensors that
  already exist: it creates no state tensor and replaces no weight storage.

Each measured figure is compared with two closed forms, written out below
(:func:`closed_form_package` and :func:`closed_form_papers`):

* **package** -- the exact bytes the package's dtypes imply (float32 low-rank moments and
  float32 bases for GaLoreAdamW; uint8 codes + one float32 absmax per 256 for 8-bit
  moments, float32 moments below 4096 elements in bitsandbytes, model-dtype moments for
  small plain parameters in the package; INT8 weight codes + float32 scale and offset per
  group of 256; INT4 bases packed two per byte + float32 scale and offset per 256;
  LoQT's NF4 codes two per byte + a uint8 absmax per 32 + float32 scale and offset per
  256 absmaxes, its INT8 basis + float32 scale and offset per 64;
  torch AdamW's 4-byte step tensor per parameter). The measured count must equal it.
* **papers (BF16 convention)** -- the papers' estimate: every weight and state element in
  BF16 (2 bytes) unless quantized: AdamW 2P weights + 4P states; GaLore 2P + (4 P_plain +
  2 sum(2 r max(m,n) + r min(m,n))); Q-GaLore 2 P_plain + 1 P_proj weights + (2 P_plain +
  sum(2 r max(m,n) + 0.5 r min(m,n))) states, no scales; 8-bit GaLore moments 1 byte,
  basis 2 bytes; 8-bit Adam 2P states.

and with the published figures (weights + optimizer states, GB): Q-GaLore paper Table 1
(Q-GaLore 0.18/0.39/0.88/3.08 for 60M/130M/350M/1B), GaLore paper Table 2 (GaLore
0.24/0.52/1.22/4.38, full-rank 0.36/0.76/2.06/7.80).

Ranks are the papers' (GaLore Table 2 / Q-GaLore Table 1): 128, 256, 256, 512 for
60M/130M/350M/1B, and 1024 for 7B (the 7B scripts of both repositories). Note that
Q-GaLore's 1B *script* uses rank 1024 (reference notes §2.8) while its Table 1 uses 512;
``--ranks 1b=1024`` measures that.

Command lines (from the repository root):

    python benchmarks/bench_memory.py                      # all configs; 60m,130m,350m real + meta
    python benchmarks/bench_memory.py --real 60m           # real run only for 60m (fast), rest meta
    python benchmarks/bench_memory.py --real ""            # meta only (seconds)
    python benchmarks/bench_memory.py --dtype float32      # float32 weights instead of bfloat16
    python benchmarks/bench_memory.py --ranks 1b=1024      # Q-GaLore's 1B script rank
    python benchmarks/bench_memory.py --configs 7b --real "" --out /tmp/m.md
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import shlex
import sys
import time

# -------------------------------------------------------------------------------------
# defaults
configs = "60m,130m,350m,1b,7b"
ranks = "60m=128,130m=256,350m=256,1b=512,7b=1024"   # the papers' ranks
real = "60m,130m,350m"   # run on the CPU for real (and compare with meta); others meta only
vocab = 32000            # T5 vocabulary of the papers' configs
dtype = "bfloat16"       # weights (and plain-parameter moments where the optimizer keeps p's dtype)
update_proj_gap = 200
svd = "exact"            # irrelevant to the bytes; "randomized" makes the real runs faster
methods = "AdamW,AdamW8bit,GaLoreAdamW,GaLoreAdamW8bit,QGaLoreAdamW8bit,LoQTAdamW,LoQTAdamW8bit"
seed = 0
threads = 1              # torch threads (1: the machine is shared; 0 = torch default)
also_float32 = True      # add a meta-only table with float32 weights (checked against the closed form)
out = "benchmarks/results/memory.md"
# -------------------------------------------------------------------------------------

from _paths import ROOT

import torch
from torch import Tensor, nn

import common as C
import lowrank_optim as lo
from common import LlamaLM, cpu_name, get_config, git_rev, stored_tensors

GB = 1e9
TARGETS = ("attn", "mlp")
ALL_METHODS = ("AdamW", "AdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW8bit",
               "LoQTAdamW", "LoQTAdamW8bit")
LOWRANK = ALL_METHODS[2:]   # the package's optimizers
LOQT = C.LOQT
SIZES = ("60m", "130m", "350m", "1b")
# published weights + optimizer states (GB), BF16 estimates of the papers
PUBLISHED = {
    "Full": dict(zip(SIZES, (0.36, 0.76, 2.06, 7.80))),      # GaLore T2 = Q-GaLore T1
    "GaLore": dict(zip(SIZES, (0.24, 0.52, 1.22, 4.38))),    # GaLore T2 = Q-GaLore T1
    "Q-GaLore": dict(zip(SIZES, (0.18, 0.39, 0.88, 3.08))),  # Q-GaLore T1
    "LoQT": dict(zip(SIZES, (0.23, 0.49, 0.98, 3.16))),      # LoQT v1 Table 1
}
# GaLore paper Table 6 split (weights / optimizer states, GB)
PUBLISHED_SPLIT = {
    "Full": dict(zip(SIZES, ((0.12, 0.23), (0.25, 0.51), (0.68, 1.37), (2.60, 5.20)))),
    "GaLore": dict(zip(SIZES, ((0.12, 0.13), (0.25, 0.28), (0.68, 0.54), (2.60, 1.78)))),
}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


# ---- building ---------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dt: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# the optimizer classes this script counts, as registry entries (common.METHODS)
REGISTRY = {"AdamW": "adamw", "AdamW8bit": "adamw8bit", "GaLoreAdamW": "galore",
            "GaLoreAdamW8bit": "galore8bit", "QGaLoreAdamW8bit": "qgalore", "LoQTAdamW": "loqt",
            "LoQTAdamW8bit": "loqt8bit"}


def _args(rank: int) -> C.MethodArgs:
    return C.MethodArgs(lr=1e-3, rank=rank, update_proj_gap=update_proj_gap, scale=0.25)


def build_model(cfg, dt: torch.dtype, device: str, method: str, rank: int) -> nn.Module:
    """LlamaLM in ``dt`` on ``device``, with the registry's swap of ``method``: for Q-GaLore
    the attention and MLP Linears become INT8 ``QuantLinear`` (groups of 256), for LoQT
    ``LoQTLinear`` (its defaults: NF4 weight in blocks of 32 with a double-quantized absmax,
    INT8 basis in groups of 64, ``dt`` factor B), quantized from the ``dt`` weights."""
    torch.manual_seed(seed)
    with default_dtype(dt), torch.device(device):
        model = LlamaLM(cfg)
    model.to(dt)  # the rotary table is built in float32 explicitly
    return C.METHODS[REGISTRY[method]].swap(model, _args(rank))


def build_optimizer(method: str, model: nn.Module, rank: int):
    m = C.METHODS[REGISTRY[method]]
    return m.optimizer(model, _args(rank), **({"svd": svd} if method in LOWRANK and
                                             method not in C.LOQT else {}))


def set_grads(model: nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:  # INT8 weights too: an ordinary float32 gradient
            p.grad = torch.randn(p.shape, dtype=p.dtype, device=p.device)


@torch.no_grad()
def meta_init(opt: lo.LowRankOptimizer) -> None:
    """``step_param``'s lazy-init path (see the module docstring), without ``rule.update`` and
    ``_apply``: creates exactly the state tensors a real first step creates."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = opt._grad(p, group)
            state = opt.state[p]
            state["step"] = 0
            if opt.is_projected(p, group):
                opt._refresh(p, g, group, state, opt._projector(group),
                             opt._refresh_policy(p, group))
            else:
                opt.rule.init(state, p, group)
            state["step"] = 1


def one_step(method: str, model: nn.Module, opt, device: str) -> None:
    if device == "meta" and method in LOWRANK:
        meta_init(opt)
    else:
        opt.step()


# ---- counting -----------------------------------------------------------------------------
def _storage_id(t: Tensor) -> int:
    # the StorageImpl's address: the same for every view of one storage, on meta too
    # (where data_ptr() is 0 for every tensor and cannot tell tensors apart)
    return t.untyped_storage()._cdata


def _key(t: Tensor):
    return (_storage_id(t), t.storage_offset(), t.numel(), t.dtype)


def _walk(v, path=""):
    if isinstance(v, Tensor):
        yield path, v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _walk(x, str(k))
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _walk(x, path)


def _category_state(key: str) -> str:
    if key.startswith("proj"):
        return "basis"
    if key.startswith("qmap") or key == "step":
        return "other"
    return "moments"


def count(model: nn.Module, opt) -> dict:
    """Bytes by category: weights (parameters + buffers) and optimizer state."""
    out = dict(w_float=0, w_int=0, w_scales=0, w_buffers=0, s_moments=0, s_basis=0, s_other=0,
               held_weights=0, held_state=0)
    seen, storages = set(), set()

    def add(cat, t):
        k = _key(t)
        if k not in seen:
            seen.add(k)
            out[cat] += t.numel() * t.element_size()
        # what is really held: whole storages, once each (a view that pins a larger
        # storage, e.g. a basis sliced from the full SVD, shows up here, not above)
        sid = _storage_id(t)
        if sid not in storages:
            storages.add(sid)
            out["held_" + ("weights" if cat.startswith("w_") else "state")] += \
                t.untyped_storage().nbytes()

    for name, kind, t in stored_tensors(model):  # LoQT: NF4 codes of Q, INT4 codes of P
        if kind == "p":
            add("w_float" if t.is_floating_point() else "w_int", t)
        else:
            add("w_int" if name.endswith("_codes") else "w_scales"
                if name.endswith(("_scale", "_offset")) else "w_buffers", t)
    for st in opt.state.values():
        for key, t in _walk(st):
            add("s_" + _category_state(key), t)
    out["weights"] = out["w_float"] + out["w_int"] + out["w_scales"] + out["w_buffers"]
    out["state"] = out["s_moments"] + out["s_basis"] + out["s_other"]
    out["total"] = out["weights"] + out["state"]
    out["views_ok"] = (out["held_weights"], out["held_state"]) == (out["weights"], out["state"])
    out["n_state_tensors"] = sum(1 for st in opt.state.values() for _ in _walk(st))
    out["svds"] = sum(st.get("refresh_count", 0) for st in opt.state.values())
    return out


def measure(method: str, cfg, rank: int, dt: torch.dtype, device: str) -> dict:
    t0 = time.perf_counter()
    model = build_model(cfg, dt, device, method, rank)
    opt = build_optimizer(method, model, rank)
    set_grads(model)
    one_step(method, model, opt, device)
    model.zero_grad(set_to_none=True)
    if method in LOWRANK:
        opt.zero_grad()
    res = count(model, opt)
    res["seconds"] = time.perf_counter() - t0
    del model, opt
    gc.collect()
    return res


# ---- closed forms ---------------------------------------------------------------------------
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
    """The papers' BF16 estimate (weights, state): 2 bytes per element unless quantized."""
    w = s = 0.0
    for _, shape, proj in shapes_of(cfg):
        n = math.prod(shape)
        r = min(rank, *shape)
        low, basis = 2 * max(shape) * r, min(shape) * r             # 2 moments, 1 basis
        if method in LOQT:
            if proj:                                                # NF4 Q, NF4 P, BF16 B
                w += 0.5 * n + 0.5 * min(shape) * r + 2.0 * max(shape) * r
                s += 2.0 * low if method == "LoQTAdamW" else 1.0 * low
            else:
                w += 2.0 * n
                s += 4.0 * n if method == "LoQTAdamW" else 2.0 * n
            continue
        w += 1.0 * n if (method == "QGaLoreAdamW8bit" and proj) else 2.0 * n
        if method == "AdamW":
            s += 4.0 * n
        elif method == "AdamW8bit":
            s += 2.0 * n
        elif method == "GaLoreAdamW":
            s += 2.0 * (low + basis) if proj else 4.0 * n
        elif method == "GaLoreAdamW8bit":
            s += 1.0 * low + 2.0 * basis if proj else 2.0 * n
        else:
            s += 1.0 * low + 0.5 * basis if proj else 2.0 * n
    return w, s


# ---- reporting ----------------------------------------------------------------------------




def gb(x) -> str:
    return "–" if x is None else f"{x / GB:.3f}"


def parse_ranks(s: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in s.split(","))):
        k, _, v = item.partition("=")
        out[k.strip().lower().removeprefix("llama_")] = int(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=configs)
    ap.add_argument("--ranks", default="", help=f"overrides, e.g. 1b=1024 (defaults {ranks})")
    ap.add_argument("--real", default=real, help="configs also run for real on the CPU")
    ap.add_argument("--methods", default=methods)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--dtype", default=dtype, choices=sorted(DTYPES))
    ap.add_argument("--svd", default=svd, choices=("exact", "randomized"))
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--also-float32", action=argparse.BooleanOptionalAction, default=also_float32,
                    help="also count every config/method with float32 weights (meta only)")
    ap.add_argument("--out", default=out, help="Markdown output ('' to skip writing)")
    a = ap.parse_args(argv)
    globals()["svd"] = a.svd
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = DTYPES[a.dtype]
    esize = torch.empty((), dtype=dt).element_size()
    rank_of = {**parse_ranks(ranks), **parse_ranks(a.ranks)}
    names = [c.strip().lower().removeprefix("llama_") for c in a.configs.split(",") if c.strip()]
    real_set = {c.strip().lower().removeprefix("llama_") for c in a.real.split(",") if c.strip()}
    meths = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in meths:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    for c in names:
        if c not in rank_of:
            ap.error(f"no rank for config {c!r}: pass --ranks {c}=R")
    t_start = time.time()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)]
                                + (sys.argv[1:] if argv is None else list(argv)))
    import bitsandbytes as bnb

    rows, checks = [], []
    for c in names:
        cfg = get_config(c, vocab_size=a.vocab)
        rank = rank_of[c]
        nparam = sum(math.prod(s) for _, s, _ in shapes_of(cfg))
        nproj = sum(math.prod(s) for _, s, p in shapes_of(cfg) if p)
        for m in meths:
            meta = measure(m, cfg, rank, dt, "meta")
            cell = dict(config=c, method=m, rank=rank, params=nparam, proj=nproj, meta=meta,
                        real=None)
            if c in real_set:
                cell["real"] = measure(m, cfg, rank, dt, "cpu")
                same = all(cell["real"][k] == meta[k] for k in meta
                           if k != "seconds")
                checks.append((c, m, cell["real"], meta, same))
            res = cell["real"] or meta
            cell["pkg"] = closed_form_package(m, cfg, rank, esize)
            cell["pap"] = closed_form_papers(m, cfg, rank)
            cell["pkg_ok"] = (res["weights"], res["state"]) == cell["pkg"]
            rows.append(cell)
            print(f"{c:>5} {m:<17} r={rank:<5} weights {gb(res['weights'])} GB  state "
                  f"{gb(res['state'])} GB  total {gb(res['total'])} GB  "
                  f"[{'real+meta' if cell['real'] else 'meta'}; "
                  f"{'= package closed form' if cell['pkg_ok'] else 'DIFFERS from closed form'}"
                  f"{'' if res['views_ok'] else '; VIEWS PIN ' + gb(res['held_weights'] + res['held_state']) + ' GB'}"
                  f"{'' if not cell['real'] else '; real ' + ('==' if checks[-1][4] else '!=') + ' meta'}"
                  f"; {(cell['real'] or meta)['seconds']:.1f} s]", flush=True)

    alt = None  # Q-GaLore's 1B *script* rank (1024), next to Table 1's 512
    if "1b" in names and rank_of["1b"] != 1024 and "QGaLoreAdamW8bit" in meths:
        cfg = get_config("1b", vocab_size=a.vocab)
        x = measure("QGaLoreAdamW8bit", cfg, 1024, dt, "meta")
        alt = dict(meta=x, pap=closed_form_papers("QGaLoreAdamW8bit", cfg, 1024),
                   pkg_ok=(x["weights"], x["state"]) == closed_form_package(
                       "QGaLoreAdamW8bit", cfg, 1024, esize))
    fp32 = []
    if a.also_float32 and dt != torch.float32:
        for c in names:
            cfg = get_config(c, vocab_size=a.vocab)
            for m in meths:
                x = measure(m, cfg, rank_of[c], torch.float32, "meta")
                ok = (x["weights"], x["state"]) == closed_form_package(m, cfg, rank_of[c], 4)
                fp32.append(dict(config=c, method=m, meta=x, pkg_ok=ok))
    md = render(rows, checks, a, dt, names, rank_of, real_set, meths, cmd, date, bnb,
                time.time() - t_start, fp32, alt)
    print()
    print(md)
    if a.out:
        path = a.out if os.path.isabs(a.out) else os.path.join(ROOT, a.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(md)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    bad = ([r for r in rows + fp32 + ([alt] if alt else []) if not r["pkg_ok"]]
           + [r for r in rows if not (r["real"] or r["meta"])["views_ok"]]
           + [x for x in checks if not x[4]])
    return 1 if bad else 0


def render(rows, checks, a, dt, names, rank_of, real_set, meths, cmd, date, bnb, secs,
           fp32=(), alt=None) -> str:
    L = []
    add = L.append
    add("# bench_memory: bytes of weights and optimizer state\n")
    add(f"- command: `{cmd}`")
    add(f"- date: {date}; total time {secs:.0f} s")
    add(f"- torch {torch.__version__}, bitsandbytes {bnb.__version__}, lowrank_optim "
        f"{lo.__version__} (git {git_rev()}), Python {platform.python_version()}")
    add(f"- device: cpu ({cpu_name()}, {os.cpu_count()} CPUs) for the real runs "
        f"({', '.join(c for c in names if c in real_set) or 'none'}); `meta` for every config")
    add(f"- model: `benchmarks/common.py` LlamaLM, vocabulary {a.vocab}, weights in {dt} "
        f"(the papers' BF16 convention for weights); ranks "
        f"{', '.join(f'{c} {rank_of[c]}' for c in names)}; update_proj_gap {update_proj_gap}, "
        f"scale 0.25, proj_type std; projected = attention and MLP matrices; svd {a.svd}")
    add("- GB = 10^9 bytes. **weights** = `numel*element_size` over `model.parameters()` + "
        "`model.buffers()` (the INT8 layers' float32 scale/offset buffers and the "
        "rotary table, "
        + ", ".join(f"{c} {rope_bytes(get_config(c), torch.empty((), dtype=dt).element_size()) / 1e3:.1f} kB"
                    for c in names) + "); "
        "**state** = every tensor reachable from `optimizer.state` after one real step "
        "(shared tensors once). Gradients and activations are not counted.")
    add("")
    add("Methods: **AdamW** = `torch.optim.AdamW`; **AdamW8bit** = `bitsandbytes.optim.AdamW8bit`; "
        "**GaLoreAdamW**, **GaLoreAdamW8bit** = `lowrank_optim` on the float model, param "
        "groups in galore-torch's format (attention + MLP matrices with `rank`, the rest "
        "plain); **QGaLoreAdamW8bit** = `lowrank_optim.QGaLoreAdamW8bit` on the model after "
        "`lo.quantize_weights(model, bits=8, group_size=256, target_modules=('attn', 'mlp'))` "
        "(INT8 codes + float32 scale/offset per 256), INT4 bases (packed, float32 scale/offset "
        "per 256), 8-bit moments; embedding, norms and head keep the model dtype; "
        "**LoQTAdamW** = `lowrank_optim.LoQTAdamW` on the model after `lo.prepare_loqt(model, "
        "rank=r, bits=4, target_modules=('attn', 'mlp'))` (its defaults: NF4 Q in blocks of 32 "
        "with the absmax as uint8 codes + float32 scale/offset per 256 blocks, INT8 P with "
        "float32 scale/offset per 64, B in the model dtype; Adam moments of B and "
        "of the plain parameters in the model dtype); **LoQTAdamW8bit** = the same with 8-bit moments "
        "(bitsandbytes blockwise, tensors of at least 4096 elements).")
    add("")
    add("Conventions. The **papers' estimates** put every weight and every optimizer-state "
        "element in BF16 (2 bytes) unless it is quantized, and ignore quantization scales. "
        "**What the package allocates** differs: GaLoreAdamW keeps its low-rank moments and "
        "its basis in float32 whatever the model dtype (plain parameters' moments follow the "
        "parameter dtype, as torch.optim.AdamW), GaLoreAdamW8bit keeps a float32 basis, 8-bit "
        "moments carry one float32 absmax per 256 elements, and tensors under 4096 elements "
        "keep unquantized moments (bitsandbytes: float32; the package: the parameter dtype). "
        "torch.optim.AdamW adds a 4-byte step tensor per parameter.")
    add("")
    add("## Measured: what the package really allocates\n")
    add("*count*: `real` = one real step on the CPU (and the meta count equal byte for byte), "
        "`meta` = meta device only. *= closed form*: measured bytes equal the package closed "
        "form exactly. *storages = tensors*: the bytes of the distinct storages behind those tensors "
        "(`untyped_storage().nbytes()`, each once) equal the `numel*element_size` sum, i.e. no "
        "tensor is a view pinning a larger buffer. *basis* is inside state; *INT8+scales* is "
        "inside weights.\n")
    add("| config | method | rank | weights GB | of which quantized codes + scales | state GB | "
        "of which basis | weights + state GB | × AdamW | count | = closed form | storages = tensors |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    adamw_total = {r["config"]: (r["real"] or r["meta"])["total"] for r in rows
                   if r["method"] == "AdamW"}
    for r in rows:
        x = r["real"] or r["meta"]
        ratio = (f"{x['total'] / adamw_total[r['config']]:.3f}"
                 if r["config"] in adamw_total else "–")
        add(f"| {r['config']} | {r['method']} | {r['rank'] if r['method'] in LOWRANK else '–'} "
            f"| {gb(x['weights'])} | {gb(x['w_int'] + x['w_scales']) if x['w_int'] else '–'} "
            f"| {gb(x['state'])} | {gb(x['s_basis']) if x['s_basis'] else '–'} "
            f"| **{gb(x['total'])}** | {ratio} | {'real' if r['real'] else 'meta'} "
            f"| {'yes' if r['pkg_ok'] else 'NO'} "
            f"| {'yes' if x['views_ok'] else 'NO: held ' + gb(x['held_weights'] + x['held_state'])} |")
    add("")
    # papers
    add("## Against the papers (weights + optimizer state, GB)\n")
    add("*published*: GaLore paper Table 2 (Full, GaLore; identical in Q-GaLore's Table 1) "
        "and Q-GaLore paper Table 1. *BF16 closed form*: the papers' convention "
        "(see the script's docstring), from the same parameter shapes. *measured*: the table "
        "above. 7B has no published weights+state estimate (the papers' 7B figures are "
        "end-to-end training memory).\n")
    cols = [c for c in names]
    add("| | " + " | ".join(cols) + " |")
    add("|---|" + "---|" * len(cols))

    def cell(method, c, what):
        r = next((r for r in rows if r["config"] == c and r["method"] == method), None)
        if r is None:
            return "–"
        if what == "measured":
            return gb((r["real"] or r["meta"])["total"])
        if what == "papers":
            return gb(sum(r["pap"]))
        if what == "package":
            return gb(sum(r["pkg"]))

    def pub(name, c):
        v = PUBLISHED[name].get(c)
        return "–" if v is None else f"{v:.2f}"

    lines = [("Full-rank, published", lambda c: pub("Full", c)),
             ("Full-rank (AdamW), BF16 closed form", lambda c: cell("AdamW", c, "papers")),
             ("AdamW measured", lambda c: cell("AdamW", c, "measured")),
             ("AdamW8bit measured", lambda c: cell("AdamW8bit", c, "measured")),
             ("GaLore, published", lambda c: pub("GaLore", c)),
             ("GaLore, BF16 closed form", lambda c: cell("GaLoreAdamW", c, "papers")),
             ("GaLoreAdamW measured (float32 low-rank moments and basis)",
              lambda c: cell("GaLoreAdamW", c, "measured")),
             ("GaLoreAdamW8bit measured", lambda c: cell("GaLoreAdamW8bit", c, "measured")),
             ("Q-GaLore, published", lambda c: pub("Q-GaLore", c)),
             ("Q-GaLore, BF16 closed form (no scales)",
              lambda c: cell("QGaLoreAdamW8bit", c, "papers")),
             ("Q-GaLore, package closed form (with scales)",
              lambda c: cell("QGaLoreAdamW8bit", c, "package")),
             ("**QGaLoreAdamW8bit measured**",
              lambda c: "**" + cell("QGaLoreAdamW8bit", c, "measured") + "**"),
             ("LoQT, published", lambda c: pub("LoQT", c)),
             ("LoQT, BF16 closed form (no scales)", lambda c: cell("LoQTAdamW", c, "papers")),
             ("**LoQTAdamW measured**",
              lambda c: "**" + cell("LoQTAdamW", c, "measured") + "**"),
             ("LoQTAdamW8bit, BF16 closed form (8-bit moments)",
              lambda c: cell("LoQTAdamW8bit", c, "papers")),
             ("**LoQTAdamW8bit measured**",
              lambda c: "**" + cell("LoQTAdamW8bit", c, "measured") + "**")]
    for label, f in lines:
        add(f"| {label} | " + " | ".join(f(c) for c in cols) + " |")

    def target(c, method="QGaLoreAdamW8bit", paper="Q-GaLore"):
        r = next((r for r in rows if r["config"] == c and r["method"] == method), None)
        p = PUBLISHED[paper].get(c)
        if r is None or p is None:
            return "–"
        t = (r["real"] or r["meta"])["total"] / GB
        return f"{t / p:.3f} {'≤ 1 ✓' if t <= p else '> 1 ✗'}"
    add("| QGaLoreAdamW8bit measured / Q-GaLore published (target ≤ 1) | "
        + " | ".join(target(c) for c in cols) + " |")
    add("| LoQTAdamW measured / LoQT published (target at 1B: ≤ 1) | "
        + " | ".join(target(c, "LoQTAdamW", "LoQT") for c in cols) + " |")
    add("| LoQTAdamW8bit measured / LoQT published (target at 1B: ≤ 1) | "
        + " | ".join(target(c, "LoQTAdamW8bit", "LoQT") for c in cols) + " |")
    if alt is not None:
        p = PUBLISHED["Q-GaLore"]["1b"]
        t = alt["meta"]["total"] / GB
        add("")
        add(f"1B at rank 1024 (the rank of Q-GaLore's 1B pretraining script, reference notes "
            f"§2.8) instead of Table 1's 512: BF16 closed form {gb(sum(alt['pap']))} GB, "
            f"QGaLoreAdamW8bit measured (meta) {gb(alt['meta']['total'])} GB "
            f"(weights {gb(alt['meta']['weights'])}, state {gb(alt['meta']['state'])}; "
            f"{'=' if alt['pkg_ok'] else '≠'} package closed form), {t / p:.3f}× the "
            f"published {p:.2f} GB.")
    add("")
    add("Published split (GaLore paper Table 6, weights / states GB): " + "; ".join(
        f"{c}: Full {PUBLISHED_SPLIT['Full'][c][0]}/{PUBLISHED_SPLIT['Full'][c][1]}, GaLore "
        f"{PUBLISHED_SPLIT['GaLore'][c][0]}/{PUBLISHED_SPLIT['GaLore'][c][1]}"
        for c in SIZES if c in cols) + ". BF16 closed form split, weights / states: " + "; ".join(
        f"{c}: Full {gb(r1['pap'][0])}/{gb(r1['pap'][1])}, GaLore {gb(r2['pap'][0])}/"
        f"{gb(r2['pap'][1])}, Q-GaLore {gb(r3['pap'][0])}/{gb(r3['pap'][1])}"
        for c in cols
        for r1 in [r for r in rows if r["config"] == c and r["method"] == "AdamW"]
        for r2 in [r for r in rows if r["config"] == c and r["method"] == "GaLoreAdamW"]
        for r3 in [r for r in rows if r["config"] == c and r["method"] == "QGaLoreAdamW8bit"])
        + ".")
    add("")
    # breakdown
    add("## Breakdown (MB = 10^6 bytes)\n")
    add("| config | method | float params | INT8 codes | INT8 scales+offsets | other buffers "
        "| moments | basis | other state, bytes (step tensors, qmaps) | state tensors |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = r["real"] or r["meta"]
        mb = lambda v: f"{v / 1e6:.2f}"
        add(f"| {r['config']} | {r['method']} | {mb(x['w_float'])} | {mb(x['w_int'])} | "
            f"{mb(x['w_scales'])} | {mb(x['w_buffers'])} | {mb(x['s_moments'])} | "
            f"{mb(x['s_basis'])} | {x['s_other']} | {x['n_state_tensors']} |")
    add("")
    if fp32:
        add("## The same with float32 weights (meta count; weights + state, GB)\n")
        add("A float32 model: torch AdamW then keeps float32 moments (16 B/parameter with the "
            "weights), the package's plain-parameter moments follow the parameter dtype, and "
            "everything the package stores in float32 is unchanged. *= closed form* as above.\n")
        add("| config | " + " | ".join(meths) + " | all = closed form |")
        add("|---|" + "---|" * (len(meths) + 1))
        for c in names:
            xs = [r for r in fp32 if r["config"] == c]
            add(f"| {c} | " + " | ".join(gb(r["meta"]["total"]) for r in xs)
                + f" | {'yes' if all(r['pkg_ok'] for r in xs) else 'NO'} |")
        add("")
    if checks:
        add("## Meta count against the real run (bytes)\n")
        add("| config | method | weights real | weights meta | state real | state meta | "
            "equal | real-run seconds |")
        add("|---|---|---|---|---|---|---|---|")
        for c, m, rl, mt, same in checks:
            add(f"| {c} | {m} | {rl['weights']} | {mt['weights']} | {rl['state']} | "
                f"{mt['state']} | {'yes' if same else 'NO'} | {rl['seconds']:.1f} |")
        add("")
    add("## How the meta counts were made\n")
    add("`torch.optim.AdamW` and `bitsandbytes.optim.AdamW8bit` run their normal `step()` on "
        "meta tensors. The package's optimizers are initialised on meta through "
        "`LowRankOptimizer.step_param`'s lazy-init calls (`opt._refresh(...)` for projected "
        "matrices: meta SVD, `Projector._store`, INT4 `quant.quantize` for Q-GaLore, "
        "`opt.rule.init` → `functional.init_adam8bit` / `zeros_like`; `opt.rule.init(state, p, "
        "group)` for plain parameters), skipping `opt.rule.update` (the bitsandbytes kernel) and "
        "`_apply` (the weight write; for INT8 weights it needs a `torch.Generator` on the "
        "weight's device, which meta refuses). Those two only write into existing tensors. "
        "The INT8 model on meta is made by `lo.quantize_weights` itself.")
    add("")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
