"""LR-QAT on a small LLaMA: validation perplexity of round-to-nearest, LR-QAT and full QAT
at W4/W3, and training memory of LR-QAT vs full QAT (docs/benchmarks.md).

    python benchmarks/bench_lr_qat.py                                # results/lr_qat.md
    python benchmarks/bench_lr_qat.py --pretrain-steps 50 --qat-steps 20 --memory-configs tiny \\
        --out /tmp/lr_qat.md                                         # smoke test
"""
import copy, math, os, time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import common as C
from lowrank_optim.lr_qat import export_lr_qat, init_scale, lr_qat_param_groups, prepare_lr_qat

TARGETS = ("attn", "mlp")
SETTINGS = {"w4pc": (4, None), "w4g128": (4, 128), "w3pc": (3, None), "w3g128": (3, 128)}
BETAS = (0.9, 0.95)  # the paper's AdamW betas, for every QAT run
CPU = torch.device("cpu")
grid = lambda bits: (-2 ** (bits - 1), 2 ** (bits - 1) - 1)  # noqa: E731 - signed b-bit range
targets = lambda model: [(n, m) for n, m in model.named_modules()  # noqa: E731 - the quantized
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
    """Full QAT (LSQ-style): a float weight fake-quantized by round-STE, learnable scales."""

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
    """Warmup 10% + cosine; next-byte loss, or KL(teacher || model) per token."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(steps // 10, steps))
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
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  {log} {step + 1}/{steps}: loss {loss.item():.4f}, {time.time() - t0:.0f} s")
    return time.time() - t0


def pretrained(a, cfg, corpus):
    """The FP model: loaded from ``--ckpt``, else pretrained with AdamW and saved there."""
    path = C.ROOT / a.ckpt.format(**vars(a))
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
    """The perplexity section: RTN absmax, RTN searched, LR-QAT, full QAT per setting."""
    new_batches = lambda: C.Batches(corpus, a.batch_size, a.seq_len, a.seed + 1,  # noqa: E731
                                    a.eval_batches, CPU)
    val = new_batches()
    fp = C.evaluate(fp_model.requires_grad_(False), val.val)
    ppl = lambda loss: f"{math.exp(loss):.3f}"  # noqa: E731
    gap = lambda loss: math.exp(loss) - math.exp(fp)  # noqa: E731
    rows, notes = [], []
    for name in a.settings:
        bits, group = SETTINGS[name]
        absmax = C.evaluate(rtn_absmax_(copy.deepcopy(fp_model), bits, group), val.val)
        model, opt = build("lrqat", fp_model, bits, group, a)
        rtn = C.evaluate(model, val.val)
        rows.append([name, ppl(absmax), ppl(rtn), "–", "–", "–"])
        note = []
        if "lrqat" in a.runs:
            secs = train(model, opt, a.qat_steps, new_batches(), f"{name} LR-QAT", fp_model)
            with torch.no_grad():
                exported, x = export_lr_qat(copy.deepcopy(model)), val.val[0][0][:4]
                equal = torch.equal(exported(x), model(x))
            lrqat = C.evaluate(exported, val.val)
            ratio = gap(lrqat) / gap(rtn)
            rows[-1][3:5] = [ppl(lrqat) + ("" if equal else " (export differs!)"), f"{ratio:.0%}"]
            note = [f"**LR-QAT's perplexity gap is {gap(lrqat):+.3f}, {ratio:.0%} of RTN's "
                    f"{gap(rtn):+.3f} (target ≤ 50%: {'met' if ratio <= 0.5 else 'NOT met'})**",
                    f"LR-QAT {secs:.0f} s"]
        if "fullqat" in a.runs and name in a.full_qat_settings:
            model, opt = build("fullqat", fp_model, bits, group, a)
            secs = train(model, opt, a.qat_steps, new_batches(), f"{name} full QAT", fp_model)
            rows[-1][5] = ppl(C.evaluate(model, val.val))
            note.append(f"full QAT {secs:.0f} s")
        notes += [f"- {name}: " + "; ".join(note)] if note else []
    return "\n\n".join([
        f"## Validation perplexity (bytes)\n\nFP model: **{ppl(fp)}**. Exported integer "
        "models whose logits differ from the trained ones are flagged. Columns: "
        "docs/benchmarks.md, bench_lr_qat.py.",
        C.md_table(["setting", "RTN absmax", "RTN searched", "LR-QAT", "gap ratio",
                    "full QAT"], rows), "\n".join(notes)])


def probe(kind, cfg_name, batch, seq_len, a):
    """Run in a fresh process: one method (W4 per-channel), two training steps; exact bytes
    of the first, peak RSS of both above the RSS before the model was built."""
    torch.set_num_threads(a.threads or torch.get_num_threads())
    cfg = C.get_config(cfg_name, seq_len=max(seq_len, C.get_config(cfg_name).seq_len))
    warm = C.LlamaLM(C.get_config("micro"))  # load kernels and thread pools first, so
    warm(torch.zeros(1, 8, dtype=torch.long)).sum().backward()  # they are not counted
    torch.optim.AdamW(warm.parameters()).step()
    del warm
    C.release_memory(CPU)
    meter = C.MemoryMeter(CPU)
    rss0 = meter.current()
    torch.manual_seed(a.seed)
    fp = C.LlamaLM(cfg)
    n_params = C.count_params(fp)
    model, opt = build(kind, fp, *SETTINGS["w4pc"], a)
    del fp
    C.release_memory(CPU)
    meter.start()
    gen = torch.Generator().manual_seed(a.seed)
    storages = lambda ts: {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # noqa: E731
                           for t in ts}
    for step in range(2):
        idx = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
        held, saved = storages([idx, *model.parameters(), *model.buffers()]), {}

        def pack(t):  # a saved tensor not held already (parameter, buffer, input)
            if t.untyped_storage().data_ptr() not in held:
                saved.update(storages([t]))
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
    """The memory section: LR-QAT and full QAT per config and batch."""
    total = lambda m: m["weights"] + m["grads"] + m["state"] + m["saved"]  # noqa: E731
    mib = lambda n: f"{n / 2 ** 20:.2f}"  # noqa: E731
    rows, verdicts = [], []
    pool = mp.get_context("spawn").Pool(1, maxtasksperchild=1)  # a fresh process per probe
    for c in a.memory_configs:
        for shape in a.memory_batches:
            lr, full = (pool.apply(probe, (kind, c, *map(int, shape.split("x")), a))
                        for kind in ("lrqat", "fullqat"))
            lean = total(full) - full["saved"] + lr["saved"]
            for m, label in ((lr, "LR-QAT"), (full, "full QAT")):
                rows.append([f"{c} ({m['params'] / 1e6:.1f}M)", shape, label,
                             f"{m['trainable'] / 1e6:.2f}M", mib(m["weights"]), mib(m["grads"]),
                             mib(m["state"]), mib(m["saved"]), mib(total(m)),
                             f"{total(m) / total(full):.2f}",
                             f"{total(m) / lean:.2f}" if m is lr else "–",
                             mib(m["peak_rss"]), f"{m['peak_rss'] / full['peak_rss']:.2f}"])
            r, p = total(lr) / total(full), lr["peak_rss"] / full["peak_rss"]
            verdicts.append(f"{c} {shape}: {r:.0%} exact ({total(lr) / lean:.0%} of lean), "
                            f"{p:.0%} peak RSS ({'met' if max(r, p) < 0.5 else 'NOT met'})")
    pool.close()
    return "\n\n".join([
        f"## Training memory, LR-QAT vs full QAT (W4 per-channel)\n\nTwo training steps, "
        f"each method in its own process; LR-QAT rank {a.rank}, int8 Φ₀; AdamW for both; "
        "MiB = 2^20 bytes. Columns: docs/benchmarks.md, bench_lr_qat.py.",
        C.md_table(["model", "batch", "method", "trainable", "weights", "grads",
                    "optimizer state", "saved", "total", "× full QAT", "× lean", "peak RSS",
                    "× full QAT"], rows),
        "- **Target (LR-QAT training memory < 50% of full QAT's): " + "; ".join(verdicts) + "**"])


def main(argv=None) -> None:
    ap = C.parser(
        __doc__, config="tiny", mlp_hidden=384, pretrain_steps=1000, pretrain_lr=1.5e-3,
        qat_steps=200, lr=3e-2, scale_lr=1e-4, rank=32, alpha=1.0, full_qat_lr=1e-4,
        batch_size=16, seq_len=128, eval_batches=32, settings="w4pc,w4g128,w3pc",
        runs="lrqat,fullqat", full_qat_settings="w4pc,w3pc",
        memory_configs="tiny,small,llama_60m", memory_batches="16x128,1x128", seed=0,
        threads=1, ckpt="runs/lr_qat_fp_{config}_{mlp_hidden}_{pretrain_steps}_{seed}.pt",
        data="", out="benchmarks/results/lr_qat.md")
    a = ap.parse_args(argv)
    for key in ("settings", "runs", "full_qat_settings", "memory_configs", "memory_batches"):
        setattr(a, key, [s.strip() for s in getattr(a, key).split(",") if s.strip()])
    if set(a.settings) - set(SETTINGS):
        ap.error(f"unknown setting in {a.settings}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(a.threads or torch.get_num_threads())
    t0, sections = time.time(), []
    meta = C.report_meta("bench_lr_qat.py", argv, C.device_name(CPU))
    if a.settings:
        corpus = C.load_corpus(a.data or None)
        cfg = C.get_config(a.config, mlp_hidden=a.mlp_hidden,
                           seq_len=max(a.seq_len, C.get_config(a.config).seq_len))
        fp_model, fp_note = pretrained(a, cfg, corpus)
        sections.append(quality(a, fp_model, corpus))
        meta["setup"] = (
            f"config `{a.config}`, MLP width {cfg.mlp_hidden} ({C.count_params(fp_model) / 1e6:.2f}M "
            f"parameters); FP model: {a.pretrain_steps} steps of AdamW (lr {a.pretrain_lr}), "
            f"{fp_note}; data: {corpus.describe()}, batches of {a.batch_size} × {a.seq_len} "
            f"bytes, validation {a.eval_batches} × {a.batch_size} fixed windows; QAT: "
            f"{a.qat_steps} steps distilling the FP model, AdamW betas {BETAS}; LR-QAT rank "
            f"{a.rank}, alpha {a.alpha}, lr {a.lr}, scale_lr {a.scale_lr}; full QAT lr "
            f"{a.full_qat_lr}")
    if a.memory_configs and a.memory_batches:
        sections.append(memory(a))
    meta["total time"] = f"{time.time() - t0:.0f} s"
    print(C.write_report(a.out, "bench_lr_qat: LR-QAT vs round-to-nearest and full QAT", meta,
                         "\n\n".join(sections)))

if __name__ == "__main__":
    main()
