"""What should happen to Adam's moments when GaLore's basis changes (or LoQT's, at a merge)?

Trains the same small LLaMA-style model on the built-in corpus (Python stdlib sources,
byte tokens) with GaLoreAdamW under each ``state_on_refresh`` policy (``keep``: reuse the
moments as they are, the reference; ``project``: rotate them into the new basis;
``reset``: zero them), same seed, data order and steps, with a short refresh gap so that
the policy matters, and reports validation loss. Writes benchmarks/results/state_on_refresh.md.
``--method loqt`` does the same for LoQTAdamW's ``state_on_merge`` (NF4 weights, INT4
basis, merges from ``--gap`` growing by 1.2) and writes state_on_merge.md.

    python benchmarks/bench_refresh_policy.py                 # ~10 min on 2 CPU cores
    python benchmarks/bench_refresh_policy.py --method loqt   # ~25 min on 1 core
    python benchmarks/bench_refresh_policy.py --steps 20 --out /tmp/x.md   # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch

import common

import lowrank_optim as lo

CONFIG, STEPS, GAP, RANK, LR, BATCH, SEQ, SEEDS = "tiny", 400, 50, 32, 1e-2, 16, 128, (0, 1)
POLICIES = ("keep", "project", "reset")


def run(policy: str, seed: int, corpus, a) -> float:
    torch.manual_seed(seed)
    cfg = common.get_config(a.config, seq_len=a.seq_len)
    model = common.LlamaLM(cfg)
    if a.method == "loqt":
        model = lo.prepare_loqt(model, rank=a.rank, bits=4, scale=0.25,
                                target_modules=("attn", "mlp"))
        opt = lo.LoQTAdamW(model.parameters(), lr=a.lr, update_proj_gap=a.gap,
                           state_on_merge=policy)
    else:
        groups = lo.param_groups(model, rank=a.rank, update_proj_gap=a.gap, scale=0.25,
                                 state_on_refresh=policy)
        opt = lo.GaLoreAdamW(groups, lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, common.lr_lambda(a.steps // 10, a.steps))
    data = common.Batches(corpus, a.batch_size, a.seq_len, seed, 8, torch.device("cpu"))
    for _ in range(a.steps):
        x, y = data.next_train()
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    with torch.no_grad():
        return sum(model(x, y).item() for x, y in data.val) / len(data.val)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("galore", "loqt"), default="galore")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--gap", type=int, default=GAP)
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--seq-len", type=int, default=SEQ)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="default: results/state_on_refresh.md (galore) or state_on_merge.md")
    a = ap.parse_args(argv)
    key = "state_on_merge" if a.method == "loqt" else "state_on_refresh"
    a.out = a.out or str(Path(__file__).parent / "results" / f"{key}.md")
    torch.set_num_threads(a.threads)
    corpus = common.load_corpus()
    t0 = time.time()
    rows = []
    for policy in POLICIES:
        losses = [run(policy, s, corpus, a) for s in a.seeds]
        mean = sum(losses) / len(losses)
        rows.append((policy, losses, mean))
        print(f"{policy:8s} " + " ".join(f"{x:.4f}" for x in losses) + f"  mean {mean:.4f}",
              flush=True)
    best = min(r[2] for r in rows)
    lines = [
        ("# LoQT: moments of B at a merge (`state_on_merge`)" if a.method == "loqt" else
         "# GaLore: moments at a basis change (`state_on_refresh`)"), "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"wall time {time.time() - t0:.0f} s",
        f"- torch {torch.__version__}, Python {platform.python_version()}, cpu, "
        f"{a.threads} thread(s)",
        f"- {corpus.describe()}",
        f"- model `{a.config}`; "
        + (f"LoQTAdamW on prepare_loqt(attn+MLP, NF4 W, INT8 P), rank {a.rank}, merges from "
           f"gap {a.gap} growing by 1.2, " if a.method == "loqt" else
           f"GaLoreAdamW on attn+MLP matrices, rank {a.rank}, update_proj_gap {a.gap}, ")
        + f"scale 0.25, lr {a.lr}, warmup {a.steps // 10} + cosine; "
        f"{a.steps} steps of {a.batch_size}x{a.seq_len} bytes; seeds {a.seeds}", "",
        f"| {key} | val loss per seed | mean val loss | mean ppl | vs best |",
        "|---|---|---|---|---|",
    ]
    for policy, losses, mean in rows:
        lines.append(f"| {policy} | {', '.join(f'{x:.4f}' for x in losses)} | {mean:.4f} | "
                     f"{math.exp(mean):.3f} | {math.exp(mean - best):.3f}x |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
