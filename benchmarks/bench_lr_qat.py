"""LR-QAT on a small LLaMA: validation perplexity of FP, round-to-nearest and LR-QAT at
W4 per-channel, W4 groups of 128 and W3 per-channel, and training memory vs full QAT.

1. A ``common.LlamaLM`` (config ``tiny`` with a 384-wide MLP by default, so that every
   matrix's input width is a multiple of 128) is pretrained with ``torch.optim.AdamW`` on
   the stdlib corpus (bytes), or loaded from ``--ckpt`` when a checkpoint of the same
   settings is there (``runs/`` is git-ignored).
2. For each setting, with attention and MLP matrices quantized and the embedding, norms
   and head kept in float32 (the paper's setup): **RTN absmax** (scale = absmax / qmax),
   **RTN searched** (the MSE range search of ``init_scale``: LR-QAT's start, checked equal
   to it), **LR-QAT** after ``--qat-steps`` steps of ``torch.optim.AdamW`` on
   ``lr_qat_param_groups`` (everything else frozen), evaluated as the exported integer
   model (``export_lr_qat``; its logits are checked equal to the trained model's), and
   optionally **full QAT** (every quantized matrix a trainable float32 weight,
   fake-quantized by round-STE with learnable scales, same steps, same optimizer).
3. Memory of one training step, LR-QAT vs full QAT, on ``--memory-configs``, each in a
   fresh process: exact bytes of weights + buffers, gradients, optimizer state and the
   tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
   storages not already held as parameters/buffers/inputs), and the peak RSS (VmHWM,
   reset after the model is converted) above the process's RSS before building it.

Command lines (from the repository root):

    python benchmarks/bench_lr_qat.py                                # the README's numbers
    python benchmarks/bench_lr_qat.py --pretrain-steps 50 --qat-steps 20 --memory-configs tiny \\
        --out /tmp/lr_qat.md                                         # smoke test
    python benchmarks/bench_lr_qat.py --settings w4pc --runs lrqat   # one setting, no full QAT
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

# -------------------------------------------------------------------------------------
# defaults
config = "tiny"            # common.CONFIGS: 128 hidden, 4 layers, 4 heads
mlp_hidden = 384           # 344 in common.py; 384 = 3 x 128 so that groups of 128 fit
pretrain_steps = 1000
pretrain_lr = 1.5e-3       # the shoot-out's best AdamW rate for "tiny"
qat_steps = 200
# Rates from a small sweep at 200 distillation steps (validation loss): LR-QAT W3pc lr 3e-3 /
# 1e-2 / 3e-2 -> 1.2583 / 1.2525 / 1.2487 (scale_lr 1e-3 instead of 1e-4 at lr 1e-2: 1.2522);
# W4pc lr 1e-2 / 3e-2 -> 1.2443 / 1.2436; full QAT W4pc lr 1e-4 / 3e-4 -> 1.2434 / 1.2447.
lr = 3e-2                  # adapters A, B (paper: 1e-3 for 10k steps on 7B)
scale_lr = 1e-4            # scales (paper: 1e-5)
rank = 32
alpha = 1.0
full_qat_lr = 1e-4         # full QAT's weights (paper's search: 1e-5 .. 1e-3)
betas = (0.9, 0.95)        # the paper's AdamW betas, for every QAT run
objective = "kd"           # "kd": match the FP model's next-byte distribution (KL); "ce": next-byte loss
fp_cont_lr = 4e-4          # "ce" only: the control trains the FP model this many steps at this lr
batch_size = 16
seq_len = 128
eval_batches = 32
settings = "w4pc,w4g128,w3pc"
runs = "lrqat,fullqat"
full_qat_settings = "w4pc,w3pc"   # full QAT's quality is measured for these settings only
memory_configs = "tiny,small,llama_60m"
memory_batches = "16x128,1x128"   # batch x sequence length of the memory probes
seed = 0
threads = 1
ckpt = "runs/lr_qat_fp_{config}_{mlp_hidden}_{pretrain_steps}_{seed}.pt"
data = None                # None: the stdlib corpus
out = "benchmarks/results/lr_qat.md"
# -------------------------------------------------------------------------------------

from _paths import ROOT

import torch
import torch.nn.functional as F
from torch import nn

import lowrank_optim as lo
import common as C
from common import cpu_name, git_rev
from lowrank_optim.lr_qat import (export_lr_qat, init_scale, lr_qat_param_groups,
                                  prepare_lr_qat)

TARGETS = ("attn", "mlp")
SETTINGS = {"w4pc": (4, None), "w4g128": (4, 128), "w3pc": (3, None), "w3g128": (3, 128),
            "w4g64": (4, 64), "w2g64": (2, 64)}


def _grid(bits):
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def _targets(model):
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and any(t in n for t in TARGETS)]


# ---- baselines ------------------------------------------------------------------------
@torch.no_grad()
def rtn_absmax_(model, bits, group_size):
    """Round-to-nearest in place, scale = absmax / qmax per channel or group."""
    lo_, hi = _grid(bits)
    for _, m in _targets(model):
        out_f, in_f = m.weight.shape
        w = m.weight.float().view(out_f, -1, group_size or in_f)
        s = (w.abs().amax(-1, keepdim=True) / hi).clamp_min(1e-12)
        m.weight.copy_((torch.round(w / s).clamp(lo_, hi) * s).view(out_f, in_f))
    return model


class FakeQuantLinear(nn.Module):
    """Full QAT (LSQ-style): a trainable float weight, quantized in every forward by
    round-STE with learnable scales (initialised by the same range search), in plain
    autograd; its gradient flows to every weight and to the scales (with LSQ's -w/s
    term)."""

    def __init__(self, linear, bits, group_size):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.scale = nn.Parameter(init_scale(linear.weight, bits, group_size))
        self.bias, self.bits, self.group = linear.bias, bits, group_size or linear.in_features

    def forward(self, x):
        out_f, in_f = self.weight.shape
        s = self.scale[..., None]
        z = self.weight.view(out_f, -1, self.group) / s
        n = (z + (torch.round(z) - z).detach()).clamp(*_grid(self.bits))
        return F.linear(x, (n * s).view(out_f, in_f), self.bias)


def prepare_full_qat(model, bits, group_size):
    for name, m in _targets(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeQuantLinear(m, bits, group_size))
    return model


def build(kind, fp_model, bits, group_size, a):
    """A frozen copy of ``fp_model`` prepared for ``kind`` and its optimizer."""
    model = copy.deepcopy(fp_model).requires_grad_(False)
    if kind == "lrqat":
        prepare_lr_qat(model, bits=bits, rank=a.rank, alpha=a.alpha, group_size=group_size,
                       target_modules=TARGETS)
        groups = lr_qat_param_groups(model, lr=a.lr, scale_lr=a.scale_lr)
    else:
        prepare_full_qat(model, bits, group_size)
        fq = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
        groups = [{"params": [m.weight for m in fq], "lr": a.full_qat_lr},
                  {"params": [m.scale for m in fq], "lr": a.scale_lr}]
    return model, torch.optim.AdamW(groups, betas=a.betas, weight_decay=0.0)


# ---- training and evaluation -----------------------------------------------------------
def distill_loss(model, teacher, x):
    """KL(teacher || model) per token, the teacher's logits computed without grad."""
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float(), -1).flatten(0, 1)
    pred = F.log_softmax(model(x).float(), -1).flatten(0, 1)
    return F.kl_div(pred, target, log_target=True, reduction="batchmean")


def train(model, opt, steps, batches, warmup, log=None, teacher=None):
    """``steps`` AdamW steps with warmup + cosine; next-byte loss, or distillation from
    ``teacher`` when given."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(warmup, steps))
    model.train()
    t0 = time.time()
    for step in range(steps):
        x, y = batches.next_train()
        loss = model(x, y) if teacher is None else distill_loss(model, teacher, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if log and ((step + 1) % max(1, steps // 5) == 0 or step + 1 == steps):
            print(f"  {log} step {step + 1}/{steps} train loss {loss.item():.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return time.time() - t0


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    losses = [model(x, y).item() for x, y in batches.val]
    model.train()
    return sum(losses) / len(losses)


def pretrained(a, cfg, corpus):
    path = a.ckpt.format(config=a.config, mlp_hidden=a.mlp_hidden,
                         pretrain_steps=a.pretrain_steps, seed=a.seed)
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    torch.manual_seed(a.seed)
    model = C.LlamaLM(cfg)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"loaded the FP model from {os.path.relpath(path, ROOT)}", flush=True)
        return model, f"loaded from `{os.path.relpath(path, ROOT)}`"
    batches = C.Batches(corpus, a.batch_size, a.seq_len, a.seed, a.eval_batches,
                        torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=a.pretrain_lr, weight_decay=0.0)
    secs = train(model, opt, a.pretrain_steps, batches, a.pretrain_steps // 10, "pretrain")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, f"pretrained here in {secs:.0f} s, saved to `{os.path.relpath(path, ROOT)}`"


def quality(a, fp_model, corpus, names):
    new_batches = lambda: C.Batches(corpus, a.batch_size, a.seq_len, a.seed + 1,
                                    a.eval_batches, torch.device("cpu"))
    val = new_batches()
    fp_model.requires_grad_(False)
    teacher = fp_model if a.objective == "kd" else None
    rows = {"fp": evaluate(fp_model, val)}
    print(f"FP val loss {rows['fp']:.4f}", flush=True)
    if a.objective == "ce":  # control: the same number of steps without quantization
        model = copy.deepcopy(fp_model).requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=a.fp_cont_lr, betas=a.betas,
                                weight_decay=0.0)
        train(model, opt, a.qat_steps, new_batches(), a.qat_steps // 10, "FP continued")
        rows["fp_cont"] = evaluate(model, val)
    x_check = val.val[0][0][:4]
    for name in names:
        bits, group = SETTINGS[name]
        r = rows[name] = {}
        r["rtn_absmax"] = evaluate(rtn_absmax_(copy.deepcopy(fp_model), bits, group), val)
        model, opt = build("lrqat", fp_model, bits, group, a)
        r["rtn_search"] = evaluate(model, val)
        if "lrqat" in a.runs:
            r["lrqat_secs"] = train(model, opt, a.qat_steps, new_batches(), a.qat_steps // 10,
                                    f"{name} LR-QAT", teacher)
            with torch.no_grad():
                logits = model(x_check)
                exported = export_lr_qat(copy.deepcopy(model))
                r["export_equal"] = bool(torch.equal(exported(x_check), logits))
            r["lrqat"] = evaluate(exported, val)
        if "fullqat" in a.runs and name in a.full_qat_settings:
            model, opt = build("fullqat", fp_model, bits, group, a)
            r["fullqat_secs"] = train(model, opt, a.qat_steps, new_batches(),
                                      a.qat_steps // 10, f"{name} full QAT", teacher)
            r["fullqat"] = evaluate(model, val)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in r.items()), flush=True)
    return rows


# ---- memory -------------------------------------------------------------------------------
def _storage_bytes(tensors):
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return seen


def probe(kind, cfg_name, a):
    """One process, one method: build, convert, measure three training steps."""
    torch.set_num_threads(a.threads or torch.get_num_threads())
    dev = torch.device("cpu")
    cfg = C.get_config(cfg_name, seq_len=max(a.seq_len, C.get_config(cfg_name).seq_len))
    warm = C.LlamaLM(C.get_config("micro"))  # load kernels and thread pools first, so
    warm(torch.zeros(1, 8, dtype=torch.long)).sum().backward()  # they are not counted
    torch.optim.AdamW(warm.parameters()).step()
    del warm
    C.release_memory(dev)
    rss0 = C._proc_status_kb("VmRSS") * 1024
    torch.manual_seed(a.seed)
    fp = C.LlamaLM(cfg)
    n_params = C.count_params(fp)
    bits, group = SETTINGS["w4pc"]
    model, opt = build(kind, fp, bits, group, a)
    del fp
    C.release_memory(dev)
    meter = C.MemoryMeter(dev)
    meter.start()
    gen = torch.Generator().manual_seed(a.seed)
    out = {}
    for step in range(2):
        idx = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=gen)
        held = _storage_bytes([idx, *model.parameters(), *model.buffers()])
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in held:
                saved[s.data_ptr()] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads = sum(C.tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            out = dict(weights=sum(held.values()) - C.tensor_bytes(idx), grads=grads,
                       state=C.state_bytes(opt), saved=sum(saved.values()),
                       trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    out["peak_rss"] = meter.peak() - rss0
    out["params"] = n_params
    return out


def memory(a, names, shapes):
    """``{(config, "BxT", kind): probe result}``, each probe in a fresh process."""
    rows = {}
    for cfg_name in names:
        for shape in shapes:
            b, t = shape.split("x")
            for kind in ("lrqat", "fullqat"):
                cmd = [sys.executable, os.path.abspath(__file__), "--probe",
                       f"{kind}:{cfg_name}", "--batch-size", b, "--seq-len", t,
                       "--rank", str(a.rank), "--threads", str(a.threads),
                       "--seed", str(a.seed)]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    raise RuntimeError(f"memory probe {kind}:{cfg_name} failed:\n{res.stderr}")
                rows[cfg_name, shape, kind] = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"memory {cfg_name} {shape} {kind}: {rows[cfg_name, shape, kind]}",
                      flush=True)
    return rows


# ---- report ---------------------------------------------------------------------------------
def _ppl(loss):
    return f"{math.exp(loss):.3f}"


def _mib(n):
    return f"{n / 2 ** 20:.2f}"


def _gaps(q, name):
    """(LR-QAT's perplexity gap, RTN searched's gap): LR-QAT against the same number of
    FP training steps when there is that control ("ce"), RTN against the FP model."""
    ppl = lambda key: math.exp(q[key] if isinstance(key, str) else q[name][key[1]])
    ref = "fp_cont" if "fp_cont" in q else "fp"
    return ppl(("", "lrqat")) - ppl(ref), ppl(("", "rtn_search")) - ppl("fp")


def verdicts(q):
    """The issue's quality targets, from the quality rows."""
    out = []
    for name, label in (("w4pc", "W4 per-channel"), ("w3pc", "W3 per-channel")):
        if name not in q or "lrqat" not in q[name]:
            continue
        g, rtn = _gaps(q, name)
        need = "≤ 50% of RTN's" if name == "w4pc" else "much better than RTN: ≤ 50% taken here"
        out.append(f"{label}: LR-QAT's perplexity gap is {g:+.3f}, {g / rtn:.0%} of RTN's "
                   f"{rtn:+.3f} (target {need}: {'met' if g <= 0.5 * rtn else 'NOT met'})")
    return out


def _header(a, cfg, corpus, fp_note, cmd, date, secs):
    import bitsandbytes as bnb

    lines = [
        "# bench_lr_qat: LR-QAT vs round-to-nearest and full QAT\n",
        f"- command: `{cmd}`",
        f"- date: {date}; total time {secs:.0f} s",
        f"- torch {torch.__version__}, bitsandbytes {bnb.__version__}, lowrank_optim "
        f"{lo.__version__} (git {git_rev()}), Python {platform.python_version()}",
        f"- device: cpu ({cpu_name()}), {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs"]
    if fp_note:
        lines += [
            f"- model: `common.py` config `{a.config}` with MLP width {cfg.mlp_hidden} (dim "
            f"{cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, byte vocabulary, "
            f"{C.count_params(C.LlamaLM(cfg)) / 1e6:.2f}M parameters); FP model: "
            f"{a.pretrain_steps} steps of AdamW (lr {a.pretrain_lr}, warmup 10%, cosine to "
            f"10%), {fp_note}",
            f"- data: {corpus.describe()}; batches of {a.batch_size} × {a.seq_len} bytes; "
            f"validation: {a.eval_batches} × {a.batch_size} fixed windows",
            f"- quantized: all {7 * cfg.n_layers} attention and MLP matrices, symmetric signed "
            f"grid [-2^(b-1), 2^(b-1)-1]; embedding, norms and head stay float32 and frozen; "
            f"groups run along a row's inputs (input width {cfg.dim} for q/k/v/o/gate/up, "
            f"{cfg.mlp_hidden} for down: groups of {cfg.dim} are per-channel there)",
            "- training objective of every QAT run: " + (
                "distillation from the FP model (KL of the next-byte distributions), so the "
                "FP model is the reference" if a.objective == "kd" else
                f"next-byte loss; control: the FP model trained as many steps (AdamW lr "
                f"{a.fp_cont_lr}, all parameters)"),
            f"- LR-QAT: `prepare_lr_qat(rank={a.rank}, alpha={a.alpha}, storage='int8')`, "
            f"{a.qat_steps} steps of `torch.optim.AdamW(lr_qat_param_groups(model, lr={a.lr}, "
            f"scale_lr={a.scale_lr}), betas={a.betas}, weight_decay=0)`, warmup 10%, cosine "
            f"to 10%; evaluated after `export_lr_qat` (integer codes + scales)"]
        if "fullqat" in a.runs:
            lines.append(
                f"- full QAT: float32 weights fake-quantized by round-STE (LSQ-style, learnable "
                f"scales from the same range search), same steps, data, objective and "
                f"schedule, AdamW lr {a.full_qat_lr} (weights) / {a.scale_lr} (scales)")
    return lines + [""]


def _quality_table(a, q):
    ref = ("FP continued" if "fp_cont" in q else "FP")
    L = ["## Validation perplexity (bytes)\n",
         f"FP model: **{_ppl(q['fp'])}**" + (
             f"; FP trained {a.qat_steps} more steps (the control): **{_ppl(q['fp_cont'])}**"
             if "fp_cont" in q else "") + ". *RTN absmax*: round-to-nearest with scale = "
         "absmax/qmax. *RTN searched*: round-to-nearest with the scales of `init_scale` (per "
         "group, the best of 81 clipping ratios for the squared error): LR-QAT's starting "
         f"point (its step-0 model computes exactly it). *gap ratio*: (LR-QAT − {ref}) / "
         "(RTN searched − FP), in perplexity.\n",
         "| setting | RTN absmax | RTN searched | LR-QAT | gap ratio | full QAT |",
         "|---|---|---|---|---|---|"]
    for name in (n for n in q if n not in ("fp", "fp_cont")):
        r = q[name]
        lr_cell, ratio = "–", "–"
        if "lrqat" in r:
            g, rtn = _gaps(q, name)
            lr_cell = _ppl(r["lrqat"]) + ("" if r["export_equal"] else " (export differs!)")
            ratio = f"{g / rtn:.0%}"
        L.append(f"| {name} | {_ppl(r['rtn_absmax'])} | {_ppl(r['rtn_search'])} | {lr_cell} "
                 f"| {ratio} | {_ppl(r['fullqat']) if 'fullqat' in r else '–'} |")
    L.append("")
    eq = [n for n in q if n not in ("fp", "fp_cont") and q[n].get("export_equal")]
    if eq:
        L.append(f"The exported integer models' logits equalled the trained models' bit for "
                 f"bit ({', '.join(eq)}).")
    times = [f"{n}: LR-QAT {q[n]['lrqat_secs']:.0f} s" + (
        f", full QAT {q[n]['fullqat_secs']:.0f} s" if "fullqat_secs" in q[n] else "")
        for n in q if n not in ("fp", "fp_cont") and "lrqat_secs" in q[n]]
    if times:
        L.append(f"Training time ({a.qat_steps} steps): " + "; ".join(times) + ".")
    return L + [""] + [f"- **{v}**" for v in verdicts(q)] + [""]


def _memory_table(a, mem):
    total = lambda m: m["weights"] + m["grads"] + m["state"] + m["saved"]
    L = ["## Training memory, LR-QAT vs full QAT (W4 per-channel)\n",
         f"Two training steps per row, each method in its own process (random bytes, random "
         f"init: memory does not depend on the values); every attention/MLP matrix "
         f"quantized, the rest frozen; LR-QAT rank {a.rank}, int8 Φ₀; AdamW for both. "
         "MiB = 2^20 bytes. *weights*: every parameter and buffer (the frozen float32 "
         "embedding and head included); *saved*: the tensors autograd keeps for backward "
         "that are not parameters, buffers or the input (activations, and for full QAT the "
         "fake-quant intermediates, weight-sized); *total*: the sum of these four exact "
         "counts; *peak RSS*: VmHWM during the steps above the RSS before the model was "
         "built (it adds backward's transients: LR-QAT rebuilds one layer's dense weight "
         "there, full QAT's weight gradients). "
         "*× lean*: LR-QAT's total over that of a full QAT that would save no fake-quant "
         "intermediates (full QAT's total with LR-QAT's saved bytes in place of its own).\n",
         "| model | batch | method | trainable | weights | grads | optimizer state | saved "
         "| total | × full QAT | × lean | peak RSS | × full QAT |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdict = []
    for c, shape in dict.fromkeys((c, s) for c, s, _ in mem):
        full, lr = mem[c, shape, "fullqat"], mem[c, shape, "lrqat"]
        lean = total(full) - full["saved"] + lr["saved"]
        for kind, label in (("lrqat", "LR-QAT"), ("fullqat", "full QAT")):
            m = mem[c, shape, kind]
            L.append(f"| {c} ({m['params'] / 1e6:.1f}M) | {shape} | {label} | "
                     f"{m['trainable'] / 1e6:.2f}M | {_mib(m['weights'])} | {_mib(m['grads'])} "
                     f"| {_mib(m['state'])} | {_mib(m['saved'])} | {_mib(total(m))} | "
                     f"{total(m) / total(full):.2f} | "
                     f"{f'{total(m) / lean:.2f}' if kind == 'lrqat' else '–'} | "
                     f"{_mib(m['peak_rss'])} | {m['peak_rss'] / full['peak_rss']:.2f} |")
        r, p = total(lr) / total(full), lr["peak_rss"] / full["peak_rss"]
        verdict.append(f"{c} {shape}: {r:.0%} exact ({total(lr) / lean:.0%} of lean), "
                       f"{p:.0%} peak RSS ({'met' if max(r, p) < 0.5 else 'NOT met'})")
    return L + ["", "- **Target (LR-QAT training memory < 50% of full QAT's): "
                + "; ".join(verdict) + "**", ""]


def render(a, cfg, corpus, fp_note, q, mem, cmd, date, secs):
    L = _header(a, cfg, corpus, fp_note, cmd, date, secs)
    if q:
        L += _quality_table(a, q)
    if mem:
        L += _memory_table(a, mem)
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=config)
    ap.add_argument("--mlp-hidden", type=int, default=mlp_hidden)
    ap.add_argument("--pretrain-steps", type=int, default=pretrain_steps)
    ap.add_argument("--pretrain-lr", type=float, default=pretrain_lr)
    ap.add_argument("--qat-steps", type=int, default=qat_steps)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--scale-lr", type=float, default=scale_lr)
    ap.add_argument("--rank", type=int, default=rank)
    ap.add_argument("--alpha", type=float, default=alpha)
    ap.add_argument("--full-qat-lr", type=float, default=full_qat_lr)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--eval-batches", type=int, default=eval_batches)
    ap.add_argument("--settings", default=settings, help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--runs", default=runs, help="comma list of lrqat, fullqat")
    ap.add_argument("--objective", default=objective, choices=("kd", "ce"))
    ap.add_argument("--fp-cont-lr", type=float, default=fp_cont_lr)
    ap.add_argument("--full-qat-settings", default=full_qat_settings)
    ap.add_argument("--memory-configs", default=memory_configs,
                    help="comma list of common.CONFIGS names ('' to skip the memory table)")
    ap.add_argument("--memory-batches", default=memory_batches, help="comma list of BxT")
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--threads", type=int, default=threads, help="torch threads (0: default)")
    ap.add_argument("--ckpt", default=ckpt, help="FP model cache (format fields: config, "
                    "mlp_hidden, pretrain_steps, seed)")
    ap.add_argument("--data", default=data, help="text file or folder (default: stdlib)")
    ap.add_argument("--out", default=out, help="Markdown output ('' to skip writing)")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.betas = betas
    a.runs = a.runs.split(",")
    a.full_qat_settings = a.full_qat_settings.split(",")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        kind, cfg_name = a.probe.split(":")
        print(json.dumps(probe(kind, cfg_name, a)))
        return 0
    names = [s.strip() for s in a.settings.split(",") if s.strip()]
    for n in names:
        if n not in SETTINGS:
            ap.error(f"unknown setting {n!r}; choose from {', '.join(SETTINGS)}")
    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)]
                                + (sys.argv[1:] if argv is None else list(argv)))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t_start = time.time()
    corpus = C.load_corpus(a.data)
    cfg = C.get_config(a.config, mlp_hidden=a.mlp_hidden,
                       seq_len=max(a.seq_len, C.get_config(a.config).seq_len))
    print(corpus.describe(), flush=True)
    q = fp_note = None
    if names:
        fp_model, fp_note = pretrained(a, cfg, corpus)
        q = quality(a, fp_model, corpus, names)
    mem_names = [c.strip() for c in a.memory_configs.split(",") if c.strip()]
    shapes = [x.strip() for x in a.memory_batches.split(",") if x.strip()]
    mem = memory(a, mem_names, shapes) if mem_names and shapes else None
    md = render(a, cfg, corpus, fp_note, q, mem, cmd, date, time.time() - t_start)
    print()
    print(md)
    if a.out:
        path = a.out if os.path.isabs(a.out) else os.path.join(ROOT, a.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(md)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
