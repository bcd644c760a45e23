"""Training-memory estimate per method for the LLaMA configs (60M ... 13B): weights, state,
gradients, saved activations, their sum and a model of the step's peak; ``--check`` configs
also run for real and must match (docs/benchmarks.md).

    python benchmarks/estimate_memory.py                 # estimate.md + .png, 60m checked
    python benchmarks/estimate_memory.py --seq 256 --batch 1 --checkpointing
"""
from __future__ import annotations

import contextlib, functools, math, sys
from unittest import mock

from _paths import ROOT

import torch
import torch.nn.functional as F

import bench_memory as bm
import common as C
from common import LlamaLM, get_config, stored_tensors
from lowrank_optim.functional import _CHUNK  # elements per bitsandbytes call in adam8bit_

GB = 1e9
CONFIGS = "60m,130m,350m,1b,7b,13b"
RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024, "13b": 1024}
# registry name -> (optimizer class, per-layer updates) for the methods whose storage is
# the closed form's (INT8 weights only with Q-GaLore; no NAME+key=value variants)
METHODS = {n: (m.optimizer_class, m.per_layer) for n, m in C.METHODS.items()
           if m.optimizer_class in C.CLOSED_FORM and not m.prepare_kwargs
           and (m.prepare is not C._int8_weights or m.optimizer_class == "QGaLoreAdamW8bit")}
DEFAULT_METHODS = ("adamw,adamw8bit,galore,galore8bit_per_layer,qgalore_per_layer,loqt,"
                   "loqt8bit_per_layer")


def _grads(method: str, cfg, rank: int, esize: int) -> list[tuple[str, tuple, bool, int]]:
    """(name, shape, projected, gradient bytes) of every parameter, in model order: float32
    for an INT8 weight, only B's for a LoQT layer."""
    return [(name, shape, proj, 4 * math.prod(shape) if proj and method == "QGaLoreAdamW8bit"
             else esize * max(shape) * min(rank, *shape) if proj and method in bm.LOQT
             else esize * math.prod(shape)) for name, shape, proj in bm.shapes_of(cfg)]


def _saved(model, run):
    """(bytes of the storages autograd saves while ``run()`` runs, each once, the model's
    own parameters and buffers not counted; what ``run()`` returned)."""
    seen, total = {C.storage_id(t) for _, _, t in stored_tensors(model)}, [0]

    def pack(t):
        if C.storage_id(t) not in seen:
            seen.add(C.storage_id(t))
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total[0], out


class _FlashSaved(torch.autograd.Function):
    """What flash attention saves for backward (q, k, v, output, a float32 logsumexp per
    query), not the math path's t×t matrix that meta would take. Forward only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = _SDPA(q, k, v, is_causal=True)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def _meta_model(cfg, dt, checkpointing: bool = False):
    """LlamaLM on meta, its attention saving what flash attention saves (:class:`_FlashSaved`)."""
    with torch.device("meta"):
        model = LlamaLM(cfg, checkpointing=checkpointing).to(dt)
    with mock.patch.object(F, "scaled_dot_product_attention",
                           lambda q, k, v, is_causal=True: _FlashSaved.apply(q, k, v)):
        yield model


@functools.lru_cache(maxsize=None)  # the same count is asked for once per method
def activation_bytes(cfg, batch: int, seq: int, dt, checkpointing: bool) -> int:
    """Saved-for-backward bytes of one forward, counted on the meta device; with
    checkpointing, plus one block's (backward recomputes one block at a time)."""
    idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with _meta_model(cfg, dt, checkpointing) as model:
        total = _saved(model, lambda: model(idx, idx))[0]
    return total + (block_bytes(cfg, batch, seq, dt) if checkpointing else 0)


@functools.lru_cache(maxsize=None)
def block_bytes(cfg, batch: int, seq: int, dt) -> int:
    """Saved-for-backward bytes of one block's forward, counted as :func:`activation_bytes`."""
    x = torch.zeros(batch, seq, cfg.dim, dtype=dt, device="meta", requires_grad=True)
    with _meta_model(cfg, dt) as model:
        return _saved(model, lambda: model.layers[0](x, model.rope_cos[:seq],
                                                     model.rope_sin[:seq]))[0]


def estimate(name: str, cfg, rank: int, dt, activations: int) -> dict:
    """One method's row; ``activations`` (:func:`activation_bytes`) is the same for all."""
    method, per_layer = METHODS[name]
    esize = torch.empty((), dtype=dt).element_size()
    w, s = bm.closed_form_package(method, cfg, rank, esize)
    sizes = [b for *_, b in _grads(method, cfg, rank, esize)]  # alive at the optimizer step
    return dict(weights=w, grads=max(sizes) if per_layer else sum(sizes), state=s,
                activations=activations)


# ---- the peak model -----------------------------------------------------------------------
def _bnb_cpu(n: int, esize: int) -> int:
    """bitsandbytes 0.50's CPU 8-bit Adam kernel: float32 copies of both moments and of the
    gradient, sqrt(v) and the denominator (20 B per element), plus a float32 copy of a
    lower-precision parameter."""
    return 20 * n + (4 * n if esize != 4 else 0)


def update_transient(method: str, shape: tuple, proj: bool, esize: int, rank: int,
                     device: str) -> int:
    """Largest temporary of one parameter's update, on top of its state and gradient, read
    off the implementation the method uses (not measured)."""
    n = math.prod(shape)
    eight = method.endswith("8bit")
    if method == "AdamW":     # torch's single-tensor AdamW: (sqrt(v) / bc2).add_(eps)
        return 2 * esize * n if device == "cpu" else 0   # (foreach: see peak_model)
    if method == "AdamW8bit":
        return _bnb_cpu(n, esize) if device == "cpu" else 0   # CUDA: one fused kernel
    if proj and method == "QGaLoreAdamW8bit":
        return 8 * n          # float32 dequantized weight + the float32 rounding temporary
    if proj:
        m = max(shape) * min(rank, *shape)   # low-rank size (GaLore R; LoQT's B)
        if method in bm.LOQT:
            n = m                            # B is stepped like a plain parameter
        else:
            extra = 4 * n if esize != 4 else 0   # float32 copy of a low-precision gradient
            return extra + 2 * 4 * m + (_bnb_cpu(min(m, _CHUNK), 4) if eight and
                                        device == "cpu" else 0)
    if eight and n >= 4096:   # package 8-bit Adam: float32 direction + one bnb slice
        return 4 * n + (_bnb_cpu(min(n, _CHUNK), 4) if device == "cpu" else 0)
    return 4 * n   # adam_: the float32 direction (low-precision moments: in slices)


def _layer_transient(method: str, cfg, esize: int) -> int:
    """A quantized layer's backward dequantizes its weight (model dtype; LoQT float32 base
    weight too): the largest matrix's worth."""
    if method == "QGaLoreAdamW8bit":
        return esize * cfg.dim * cfg.mlp_hidden
    return max(esize, 4) * cfg.dim * cfg.mlp_hidden if method in bm.LOQT else 0


def peak_model(name: str, cfg, rank: int, dt, batch: int, seq: int,
               checkpointing: bool = False, device: str = "cpu") -> dict:
    """Weights + optimizer state + the largest of the phases *loss* (the float32 logits
    gradient), *backward* (walked from the head to the embedding: activations still saved,
    gradients so far, the moment's transients; per-layer updates: one hook's gradient and
    update temporaries) and *step* (every gradient + the largest update temporary). The
    phases' bytes, ``phase`` (the largest) and ``peak``; docs/benchmarks.md has the model."""
    method, per_layer = METHODS[name]
    esize = torch.empty((), dtype=dt).element_size()
    w, s = bm.closed_form_package(method, cfg, rank, esize)
    params = _grads(method, cfg, rank, esize)
    trans = {nm: update_transient(method, sh, pr, esize, rank, device)
             for nm, sh, pr, _ in params}
    a_block = block_bytes(cfg, batch, seq, dt)
    a_rest = activation_bytes(cfg, batch, seq, dt, False) - cfg.n_layers * a_block
    kept = a_block
    if checkpointing:  # each block keeps its input until backward recomputes it
        kept = (activation_bytes(cfg, batch, seq, dt, True) - a_block - a_rest) // cfg.n_layers
    N, V, d = batch * seq, cfg.vocab_size, cfg.dim
    stage = {}
    for nm, _, _, b in params:
        key = nm.split(".")[1] if nm.startswith("layers.") else nm.split(".")[0]
        stage.setdefault(key, []).append((nm, b))

    def hook(grads):  # per-layer: the largest (gradient + update temporaries) of a stage
        return max(b + trans[nm] for nm, b in grads)

    live = a_rest + cfg.n_layers * kept
    head = [x for k in ("lm_head", "norm") for x in stage[k]]
    loss = max(8 * N * V, 4 * N * V + esize * N * V, esize * (N * V + V * d + N * d))
    phases = {"loss": max(live + loss, live + hook(head) if per_layer else 0)}
    g_acc = 0 if per_layer else sum(b for _, b in head)
    live -= a_rest
    for i in reversed(range(cfg.n_layers)):
        grads = stage[str(i)]
        block = (a_block if checkpointing else 0) + _layer_transient(method, cfg, esize)
        now = hook(grads) if per_layer else sum(b for _, b in grads)
        phases["backward"] = max(phases.get("backward", 0), live + block + g_acc + now)
        live -= kept
        g_acc += 0 if per_layer else sum(b for _, b in grads)
    emb = stage["embed"]
    phases["backward"] = max(phases["backward"], g_acc + (hook(emb) if per_layer else
                                                           sum(b for _, b in emb)))
    if not per_layer:
        step = max(trans.values())
        if method == "AdamW" and device != "cpu":  # torch's foreach AdamW: a sqrt(v) copy
            step = esize * sum(math.prod(sh) for _, sh, _, _ in params)
        phases["step"] = sum(b for *_, b in params) + step
    top = max(phases, key=phases.get)
    return dict(weights=w, state=s, **phases, phase=top, peak=w + s + phases[top])


def check(name: str, cfg, rank: int, dt, batch: int, seq: int, activations: int):
    """(measured, estimated) gradient and saved-activation bytes of one real forward and
    backward on the CPU."""
    method, per_layer = METHODS[name]
    model = bm.build_model(cfg, dt, "cpu", method, rank)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    saved, loss = _saved(model, lambda: model(idx, idx))
    loss.backward()
    sizes = [C.tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None]
    real = dict(grads=max(sizes) if per_layer else sum(sizes), activations=saved)
    est = estimate(name, cfg, rank, dt, activations)
    return real, {k: est[k] for k in real}


def main(argv=None) -> int:
    a = C.parser(__doc__, configs=CONFIGS, methods=DEFAULT_METHODS, batch=1, seq=256,
                 vocab=32000, dtype="bfloat16", checkpointing=False, device="cpu", check="60m",
                 out="benchmarks/results/estimate.md", threads=1).parse_args(argv)
    torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    names, meths = bm.names_of(a.configs), [m.strip() for m in a.methods.split(",") if m.strip()]
    rows, peaks, checks = {}, {}, []
    for c in names:
        cfg = get_config(c, vocab_size=a.vocab, seq_len=max(a.seq, 256))
        acts = activation_bytes(cfg, a.batch, a.seq, dt, a.checkpointing)
        for m in meths:
            rows[c, m] = estimate(m, cfg, RANKS[c], dt, acts)
            peaks[c, m] = peak_model(m, cfg, RANKS[c], dt, a.batch, a.seq, a.checkpointing,
                                     a.device)
    for c in bm.names_of(a.check):
        cfg = get_config(c, vocab_size=a.vocab, seq_len=max(a.seq, 256))
        for m in meths:
            real, est = check(m, cfg, RANKS[c], dt, 1, 32, activation_bytes(cfg, 1, 32, dt, False))
            checks.append((c, m, real, est))
            print(f"check {c} {m}: real {real} estimate {est} "
                  f"{'EQUAL' if real == est else 'DIFFER'}", flush=True)
    meta = {
        "command": f"`{C.command_line('estimate_memory.py', argv)}`",
        "settings": f"torch {torch.__version__}; weights in {dt}; batch {a.batch} x {a.seq} "
                    f"tokens; activation checkpointing {'on' if a.checkpointing else 'off'}; "
                    "ranks " + ", ".join(f"{c} {RANKS[c]}" for c in names),
        "counts": "weights and optimizer state: `common.closed_form` (checked against real "
                  "tensors by bench_memory.py); gradients: closed form; activations: bytes "
                  "saved for backward in one forward, counted on the meta device; *total*: "
                  "their sum (the papers' convention); *peak (model)*: `peak_model` "
                  f"({a.device} implementations' temporaries) and the phase it lands in; no "
                  "runtime, no allocator slack (docs/benchmarks.md)"}
    table = []
    for (c, m), r in rows.items():
        tot, base = sum(r.values()), sum(rows.get((c, "adamw"), {}).values())
        table.append([c, m] + [f"{r[k] / GB:.3f}" for k in ("weights", "grads", "state",
                                                             "activations")]
                     + [f"**{tot / GB:.3f}**", f"{tot / base:.2f}" if base else "–",
                        f"{peaks[c, m]['peak'] / GB:.3f}", peaks[c, m]["phase"]])
    body = C.md_table(["config", "method", "weights", "grads", "optimizer state", "activations",
                       "total", "× AdamW", "peak (model)", "phase"], table)
    if checks:
        body += "\n\n## Check against a real forward/backward (1 x 32 tokens, bytes)\n\n" + \
            C.md_table(["config", "method", "grads real", "grads estimate",
                        "saved activations real", "estimate", "equal"],
                       [[c, m, real["grads"], est["grads"], real["activations"],
                         est["activations"], "yes" if real == est else "NO"]
                        for c, m, real, est in checks])
    print(C.write_report(a.out, "Training-memory estimate per method (GB = 10^9 bytes)", meta,
                         body))
    if a.out:
        _plot(rows, names, meths, str((ROOT / a.out).with_suffix(".png")))
    return 0 if all(r == e for _, _, r, e in checks) else 1


def _plot(rows, names, meths, path) -> None:
    if not (plt := C.pyplot()):
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 4), squeeze=False)
    for ax, c in zip(axes[0], names):
        bottom = [0.0] * len(meths)
        for part in ("weights", "grads", "state", "activations"):
            vals = [rows[c, m][part] / GB for m in meths]
            ax.bar(range(len(meths)), vals, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(c)
        ax.set_xticks(range(len(meths)), meths, rotation=70, fontsize=7)
        ax.set_ylabel("GB")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
