"""LR-QAT on a small LLaMA: validation perplexity of FP, round-to-nearest, LR-QAT and full
QAT at W4 per-channel, W4 groups of 128 and W3 per-channel, and the training memory of
LR-QAT vs full QAT, each probe in its own process (docs/benchmarks.md).

    python benchmarks/bench_lr_qat.py                                # the README's numbers
    python benchmarks/bench_lr_qat.py --pretrain-steps 50 --qat-steps 20 --memory-configs tiny \\
        --out /tmp/lr_qat.md                                         # smoke test
    python benchmarks/bench_lr_qat.py --settings w4pc --runs lrqat   # one setting, no full QAT
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from lowrank_optim.lr_qat import export_lr_qat, init_scale, lr_qat_param_groups, prepare_lr_qat

TARGETS = ("attn", "mlp")
SETTINGS = {"w4pc": (4, None), "w4g128": (4, 128), "w3pc": (3, None), "w3g128": (3, 128),
            "w4g64": (4, 64), "w2g64": (2, 64)}
BETAS = (0.9, 0.95)  # the paper's AdamW betas, for every QAT run
CPU = torch.device("cpu")


def grid(bits):
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def targets(model):
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and any(t in n for t in TARGETS)]


@torch.no_grad()
def rtn_absmax_(model, bits, group_size):
    """Round-to-nearest in place, scale = absmax / qmax per channel or group."""
    for _, m in targets(model):
        out_f, in_f = m.weight.shape
        w = m.weight.float().view(out_f, -1, group_size or in_f)
        s = (w.abs().amax(-1, keepdim=True) / grid(bits)[1]).clamp_min(1e-12)
        m.weight.copy_((torch.round(w / s).clamp(*grid(bits)) * s).view(out_f, in_f))
    return model


class FakeQuantLinear(nn.Module):
    """Full QAT (LSQ-style): a trainable float weight, quantized in every forward by
    round-STE with learnable scales (initialised by the same range search)."""

    def __init__(self, linear, bits, group_size):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.scale = nn.Parameter(init_scale(linear.weight, bits, group_size))
        self.bias, self.bits, self.group = linear.bias, bits, group_size or linear.in_features

    def forward(self, x):
        out_f, in_f = self.weight.shape
        s = self.scale[..., None]
        z = self.weight.view(out_f, -1, self.group) / s
        n = (z + (torch.round(z) - z).detach()).clamp(*grid(self.bits))
        return F.linear(x, (n * s).view(out_f, in_f), self.bias)


def build(kind, fp_model, bits, group_size, a):
    """A frozen copy of ``fp_model`` prepared for ``kind`` (lrqat, fullqat), its AdamW."""
    model = copy.deepcopy(fp_model).requires_grad_(False)
    if kind == "lrqat":
        prepare_lr_qat(model, bits=bits, rank=a.rank, alpha=a.alpha, group_size=group_size,
                       target_modules=TARGETS)
        groups = lr_qat_param_groups(model, lr=a.lr, scale_lr=a.scale_lr)
    else:
        fq = []
        for name, m in targets(model):
            parent, _, child = name.rpartition(".")
            fq.append(FakeQuantLinear(m, bits, group_size))
            setattr(model.get_submodule(parent), child, fq[-1])
        groups = [{"params": [m.weight for m in fq], "lr": a.full_qat_lr},
                  {"params": [m.scale for m in fq], "lr": a.scale_lr}]
    return model, torch.optim.AdamW(groups, betas=BETAS, weight_decay=0.0)


def train(model, opt, steps, batches, log, teacher=None):
    """``steps`` steps, warmup 10% + cosine; next-byte loss, or with ``teacher``
    distillation: KL(teacher || model) per token."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(steps // 10, steps))
    model.train()
    t0 = time.time()
    for step in range(steps):
        x, y = batches.next_train()
        if teacher is None:
            loss = model(x, y)
        else:
            with torch.no_grad():
                target = F.log_softmax(teacher(x).float(), -1).flatten(0, 1)
            pred = F.log_softmax(model(x).float(), -1).flatten(0, 1)
            loss = F.kl_div(pred, target, log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
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
    """The FP model: loaded from ``--ckpt``, else pretrained with AdamW and saved there."""
    path = C.ROOT / a.ckpt.format(config=a.config, mlp_hidden=a.mlp_hidden,
                                  pretrain_steps=a.pretrain_steps, seed=a.seed)
    torch.manual_seed(a.seed)
    model = C.LlamaLM(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, f"loaded from `{os.path.relpath(path, C.ROOT)}`"
    batches = C.Batches(corpus, a.batch_size, a.seq_len, a.seed, a.eval_batches, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=a.pretrain_lr, weight_decay=0.0)
    secs = train(model, opt, a.pretrain_steps, batches, "pretrain")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, f"pretrained here in {secs:.0f} s, saved to `{os.path.relpath(path, C.ROOT)}`"


def quality(a, fp_model, corpus):
    """{"fp": loss, setting: {rtn_absmax, rtn_search, lrqat, fullqat, ..._secs, export_equal}}."""
    new_batches = lambda: C.Batches(corpus, a.batch_size, a.seq_len, a.seed + 1,  # noqa: E731
                                    a.eval_batches, CPU)
    val = new_batches()
    fp_model.requires_grad_(False)
    q = {"fp": evaluate(fp_model, val)}
    print(f"FP val loss {q['fp']:.4f}", flush=True)
    x_check = val.val[0][0][:4]
    for name in a.settings:
        bits, group = SETTINGS[name]
        r = q[name] = {}
        r["rtn_absmax"] = evaluate(rtn_absmax_(copy.deepcopy(fp_model), bits, group), val)
        model, opt = build("lrqat", fp_model, bits, group, a)
        r["rtn_search"] = evaluate(model, val)
        if "lrqat" in a.runs:
            r["lrqat_secs"] = train(model, opt, a.qat_steps, new_batches(), f"{name} LR-QAT",
                                    fp_model)
            with torch.no_grad():
                exported = export_lr_qat(copy.deepcopy(model))
                r["export_equal"] = bool(torch.equal(exported(x_check), model(x_check)))
            r["lrqat"] = evaluate(exported, val)
        if "fullqat" in a.runs and name in a.full_qat_settings:
            model, opt = build("fullqat", fp_model, bits, group, a)
            r["fullqat_secs"] = train(model, opt, a.qat_steps, new_batches(),
                                      f"{name} full QAT", fp_model)
            r["fullqat"] = evaluate(model, val)
        print(f"{name}: {r}", flush=True)
    return q


def probe(kind, cfg_name, a):
    """One process, one method (W4 per-channel): two training steps; exact bytes of
    weights, gradients, optimizer state and tensors saved for backward (storages that are
    not parameters, buffers or the input), and the peak RSS above the RSS before the model."""
    cfg = C.get_config(cfg_name, seq_len=max(a.seq_len, C.get_config(cfg_name).seq_len))
    warm = C.LlamaLM(C.get_config("micro"))  # load kernels and thread pools first, so
    warm(torch.zeros(1, 8, dtype=torch.long)).sum().backward()  # they are not counted
    torch.optim.AdamW(warm.parameters()).step()
    del warm
    C.release_memory(CPU)
    rss0 = C.MemoryMeter(CPU).current()
    torch.manual_seed(a.seed)
    fp = C.LlamaLM(cfg)
    n_params = C.count_params(fp)
    model, opt = build(kind, fp, *SETTINGS["w4pc"], a)
    del fp
    C.release_memory(CPU)
    meter = C.MemoryMeter(CPU)
    meter.start()
    gen = torch.Generator().manual_seed(a.seed)
    storages = lambda ts: {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # noqa: E731
                           for t in ts}
    for step in range(2):
        idx = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=gen)
        held = storages([idx, *model.parameters(), *model.buffers()])
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
    return dict(out, peak_rss=meter.peak() - rss0, params=n_params)


def memory(a):
    """``{(config, "BxT", kind): probe result}``, each probe in a fresh process."""
    rows = {}
    for cfg_name in a.memory_configs:
        for shape in a.memory_batches:
            b, t = shape.split("x")
            for kind in ("lrqat", "fullqat"):
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe",
                                      f"{kind}:{cfg_name}", "--batch-size", b, "--seq-len", t,
                                      "--rank", str(a.rank), "--threads", str(a.threads),
                                      "--seed", str(a.seed)],
                                     capture_output=True, text=True, cwd=C.ROOT)
                if res.returncode:
                    raise RuntimeError(f"memory probe {kind}:{cfg_name} failed:\n{res.stderr}")
                rows[cfg_name, shape, kind] = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"memory {cfg_name} {shape} {kind}: {rows[cfg_name, shape, kind]}",
                      flush=True)
    return rows


def quality_section(a, q):
    ppl = lambda loss: f"{math.exp(loss):.3f}"  # noqa: E731
    gap = lambda r, key: math.exp(r[key]) - math.exp(q["fp"])  # noqa: E731
    rows, verdicts, equal, times = [], [], [], []
    for name, r in ((n, r) for n, r in q.items() if n != "fp"):
        lr_cell = ratio = "–"
        if "lrqat" in r:
            g, rtn = gap(r, "lrqat"), gap(r, "rtn_search")
            lr_cell = ppl(r["lrqat"]) + ("" if r["export_equal"] else " (export differs!)")
            ratio = f"{g / rtn:.0%}"
            equal += [name] if r["export_equal"] else []
            times.append(f"{name}: LR-QAT {r['lrqat_secs']:.0f} s" + (
                f", full QAT {r['fullqat_secs']:.0f} s" if "fullqat_secs" in r else ""))
            if name in ("w4pc", "w3pc"):
                need = "≤ 50% of RTN's" if name == "w4pc" else \
                    "much better than RTN: ≤ 50% taken here"
                verdicts.append(
                    f"- **{'W4' if name == 'w4pc' else 'W3'} per-channel: LR-QAT's perplexity "
                    f"gap is {g:+.3f}, {g / rtn:.0%} of RTN's {rtn:+.3f} (target {need}: "
                    f"{'met' if g <= 0.5 * rtn else 'NOT met'})**")
        rows.append([name, ppl(r["rtn_absmax"]), ppl(r["rtn_search"]), lr_cell, ratio,
                     ppl(r["fullqat"]) if "fullqat" in r else "–"])
    return "\n\n".join([
        f"## Validation perplexity (bytes)\n\nFP model: **{ppl(q['fp'])}**. Columns: "
        "docs/benchmarks.md, bench_lr_qat.py.",
        C.md_table(["setting", "RTN absmax", "RTN searched", "LR-QAT", "gap ratio",
                    "full QAT"], rows),
        (f"The exported integer models' logits equalled the trained models' bit for bit "
         f"({', '.join(equal)}).\n" if equal else "")
        + (f"Training time ({a.qat_steps} steps): " + "; ".join(times) + "." if times else ""),
        "\n".join(verdicts)])


def memory_section(a, mem):
    total = lambda m: m["weights"] + m["grads"] + m["state"] + m["saved"]  # noqa: E731
    mib = lambda n: f"{n / 2 ** 20:.2f}"  # noqa: E731
    rows, verdict = [], []
    for c, shape in dict.fromkeys((c, s) for c, s, _ in mem):
        full, lr = mem[c, shape, "fullqat"], mem[c, shape, "lrqat"]
        lean = total(full) - full["saved"] + lr["saved"]
        for kind, label in (("lrqat", "LR-QAT"), ("fullqat", "full QAT")):
            m = mem[c, shape, kind]
            rows.append([f"{c} ({m['params'] / 1e6:.1f}M)", shape, label,
                         f"{m['trainable'] / 1e6:.2f}M", mib(m["weights"]), mib(m["grads"]),
                         mib(m["state"]), mib(m["saved"]), mib(total(m)),
                         f"{total(m) / total(full):.2f}",
                         f"{total(m) / lean:.2f}" if kind == "lrqat" else "–",
                         mib(m["peak_rss"]), f"{m['peak_rss'] / full['peak_rss']:.2f}"])
        r, p = total(lr) / total(full), lr["peak_rss"] / full["peak_rss"]
        verdict.append(f"{c} {shape}: {r:.0%} exact ({total(lr) / lean:.0%} of lean), "
                       f"{p:.0%} peak RSS ({'met' if max(r, p) < 0.5 else 'NOT met'})")
    return "\n\n".join([
        f"## Training memory, LR-QAT vs full QAT (W4 per-channel)\n\nTwo training steps, "
        f"each method in its own process; LR-QAT rank {a.rank}, int8 Φ₀; AdamW for both; "
        "MiB = 2^20 bytes. Columns: docs/benchmarks.md, bench_lr_qat.py.",
        C.md_table(["model", "batch", "method", "trainable", "weights", "grads",
                    "optimizer state", "saved", "total", "× full QAT", "× lean", "peak RSS",
                    "× full QAT"], rows),
        "- **Target (LR-QAT training memory < 50% of full QAT's): " + "; ".join(verdict) + "**"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in dict(
            config="tiny", mlp_hidden=384, pretrain_steps=1000, pretrain_lr=1.5e-3,
            qat_steps=200, lr=3e-2, scale_lr=1e-4, rank=32, alpha=1.0, full_qat_lr=1e-4,
            batch_size=16, seq_len=128, eval_batches=32, settings="w4pc,w4g128,w3pc",
            runs="lrqat,fullqat", full_qat_settings="w4pc,w3pc",
            memory_configs="tiny,small,llama_60m", memory_batches="16x128,1x128", seed=0,
            threads=1, ckpt="runs/lr_qat_fp_{config}_{mlp_hidden}_{pretrain_steps}_{seed}.pt",
            data=None, out="benchmarks/results/lr_qat.md").items():
        ap.add_argument(f"--{key.replace('_', '-')}", default=default,
                        type=type(default) if default is not None else str)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for key in ("settings", "runs", "full_qat_settings", "memory_configs", "memory_batches"):
        setattr(a, key, [s.strip() for s in getattr(a, key).split(",") if s.strip()])
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        print(json.dumps(probe(*a.probe.split(":"), a)))
        return 0
    for n in a.settings:
        if n not in SETTINGS:
            ap.error(f"unknown setting {n!r}; choose from {', '.join(SETTINGS)}")
    t_start, date = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    corpus = C.load_corpus(a.data)
    cfg = C.get_config(a.config, mlp_hidden=a.mlp_hidden,
                       seq_len=max(a.seq_len, C.get_config(a.config).seq_len))
    print(corpus.describe(), flush=True)
    meta, sections = {"command": f"`{C.command_line('bench_lr_qat.py', argv)}`", "date": date,
                      "versions": C.versions(), "device": C.device_name(CPU)}, []
    if a.settings:
        fp_model, fp_note = pretrained(a, cfg, corpus)
        sections.append(quality_section(a, quality(a, fp_model, corpus)))
        meta["model"] = (
            f"config `{a.config}` with MLP width {cfg.mlp_hidden} ({C.count_params(fp_model) / 1e6:.2f}M "
            f"parameters); FP model: {a.pretrain_steps} steps of AdamW (lr {a.pretrain_lr}), "
            f"{fp_note}; data: {corpus.describe()}; batches of {a.batch_size} × {a.seq_len} "
            f"bytes; validation: {a.eval_batches} × {a.batch_size} fixed windows")
        meta["QAT"] = (f"{a.qat_steps} steps distilling the FP model; LR-QAT rank {a.rank}, "
                       f"alpha {a.alpha}, lr {a.lr}, scale_lr {a.scale_lr}; full QAT lr "
                       f"{a.full_qat_lr}; AdamW betas {BETAS}")
    if a.memory_configs and a.memory_batches:
        sections.append(memory_section(a, memory(a)))
    meta["total time"] = f"{time.time() - t_start:.0f} s"
    print(C.write_report(a.out, "bench_lr_qat: LR-QAT vs round-to-nearest and full QAT", meta,
                         "\n\n".join(sections)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
