"""FSDP2: per-rank optimizer state and bytes communicated per refresh, measured and in
closed form.

    python benchmarks/bench_fsdp.py                       # 2 ranks on CPU (gloo), results/fsdp.md
    python benchmarks/bench_fsdp.py --layers=2 --out=/tmp/fsdp.md

Measured (2 processes, gloo, one thread each): a stack of ``--layers`` LLaMA-shaped
blocks (q, k, v, o: d×d; gate, up: h×d; down: d×h; an RMS-norm weight; d=``--width``,
h=``--hidden``), ``fully_shard``-ed per block with ``lowrank_optim.shard_placement_fn()``,
trained 2 steps by ``GaLoreAdamW`` (every matrix projected, rank ``--rank``) and by
``torch.optim.AdamW``. Per-rank state bytes = the bytes of every state tensor this rank
holds (a DTensor's local slice; the replicated basis whole). Bytes per refresh = the
payload of every collective ``opt.step()`` issues at a step where every matrix refreshes
(all-gather: its output; all-reduce: its tensor), per rank.

Closed forms, float32, W ranks, matrix m×n, r = min(rank, m, n), basis on the unsharded
side (``proj_type="std"``: min(m, n)), q = min(r + 8, m, n), one power iteration:

* GaLoreAdamW state per rank: basis min(m,n)·r (replicated) + 2 moments max(m,n)·r / W;
  a plain parameter 2·numel / W. torch AdamW: 2·numel / W.
* refresh, ``svd="exact"``: one all-gather of the gradient, m·n.
* refresh, ``svd="randomized"``: two all-gathers of W q×q triangles (TSQR) and two
  all-reduces of q·(unsharded side) (rows split: q×n; columns split: m×q).

LLaMA-7B (d=4096, h=11008, 32 blocks, vocab 32000; embeddings, head and norms plain
AdamW) is evaluated in closed form at 8 and 64 ranks. A last table says, for each
LLaMA-7B matrix, whether ``GaLoreAdamW8bit``'s 256-element moment blocks would line up
with the shard boundaries (where they do not, it raises a ValueError under FSDP2).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import socket
import sys

import _paths  # noqa: F401 - the checkout's package first

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_optim as lo

F32, MB = 4, 2 ** 20
BLOCK_8BIT = 256


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=688)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--out", default=str(_paths.HERE / "results" / "fsdp.md"))
    return ap.parse_args(argv)


# ---- closed forms -------------------------------------------------------------------------
def block_shapes(d: int, h: int) -> list[tuple[int, int]]:
    return [(d, d)] * 4 + [(h, d), (h, d), (d, h)]


def galore_state(shapes, plain: int, rank: int, world: int) -> int:
    """Per-rank GaLoreAdamW state bytes: projected ``shapes``, ``plain`` other elements."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += min(m, n) * r + 2 * max(m, n) * r / world
    return int(F32 * (total + 2 * plain / world))


def adamw_state(numel: int, world: int) -> int:
    return int(F32 * 2 * numel / world)


def refresh_bytes(m: int, n: int, rank: int, world: int, svd: str) -> int:
    """Payload of one refresh's collectives for an m×n matrix (see the module docstring)."""
    if svd == "exact":
        return F32 * m * n
    r = min(rank, m, n)
    q = min(r + 8, m, n)
    unsharded = n if m >= n else m  # the basis side, where the sketches are whole
    return F32 * (2 * world * q * q + 2 * q * unsharded)


def blocks_line_up(m: int, n: int, rank: int, world: int) -> str:
    """Would the 8-bit moments' 256-element blocks be the single-process ones, split whole
    between ranks? (Row-major moments of the projected shape.)"""
    if m < n:  # left basis: sharded on dim 1, each rank holds r×(n/W): rows interleave
        return "no (columns split: a rank's slice is not contiguous in the moment)"
    r = min(rank, m, n)
    rows = -(-m // world)
    per_rank = rows * r
    blocks = -(-m * r // BLOCK_8BIT)
    if per_rank % BLOCK_8BIT or -(-blocks // world) != per_rank // BLOCK_8BIT:
        return f"no ({rows} rows × {r} = {per_rank} elements per rank)"
    return f"yes ({per_rank // BLOCK_8BIT} blocks per rank)"


# ---- measurement --------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        self.norm = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x * self.norm
        a = self.o(torch.softmax(self.q(x) @ self.k(x).T / x.shape[1] ** 0.5, -1) @ self.v(x))
        return x + a + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class _Payload(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func.namespace in ("c10d", "_c10d_functional") and "wait" not in name \
                and "wrap" not in name:
            self.ops += 1
            if "all_gather_into_tensor" in name:  # functional: (input, group size, group)
                self.bytes += args[0].numel() * args[0].element_size() * args[1]
            elif "allgather_base" in name:  # c10d: (output, input, ...)
                self.bytes += args[0].numel() * args[0].element_size()
            elif "allreduce" in name:  # c10d: ([tensors], ...)
                self.bytes += sum(t.numel() * t.element_size() for t in args[0])
        return func(*args, **(kwargs or {}))


def _state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if lo.fsdp.is_sharded(v) else v
                total += v.numel() * v.element_size()
    return total


def _worker(rank: int, port: int, a, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=a.world)
    res = {}
    for name in ("adamw", "exact", "randomized"):
        torch.manual_seed(0)
        model = nn.Sequential(*(Block(a.width, a.hidden) for _ in range(a.layers)))
        for block in model:
            fully_shard(block, shard_placement_fn=lo.shard_placement_fn())
        fully_shard(model)
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:  # no stagger: every matrix refreshes at step 0
            opt = lo.GaLoreAdamW(model.parameters(), lr=1e-3, rank=a.rank, svd=name,
                                 stagger=False)
        x = torch.randn(16, a.width, generator=torch.Generator().manual_seed(rank))
        steps = []
        for _ in range(2):
            model(x).square().mean().backward()
            with _Payload() as p:
                opt.step()
            opt.zero_grad()
            steps.append((p.bytes, p.ops))
        res[name] = dict(state=_state_bytes(opt), refresh=steps[0], between=steps[1])
    every = [None] * a.world
    dist.all_gather_object(every, res)
    if rank == 0:
        out.update(every=every)
    dist.destroy_process_group()


def measure(a) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(port, a, out), nprocs=a.world, start_method="fork")
    return dict(out)


def main(argv=None) -> None:
    a = _args(argv)
    shapes = block_shapes(a.width, a.hidden) * a.layers
    numel = sum(m * n for m, n in shapes)
    plain = a.width * a.layers
    got = measure(a)["every"][0]
    lines = ["# bench_fsdp: FSDP2 optimizer state and refresh communication", "",
             f"- command: `{shlex.join(['python', *sys.argv])}`",
             f"- torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"gloo, {a.world} ranks, {datetime.date.today()}", "",
             f"## Measured: {a.layers} blocks, d={a.width}, h={a.hidden}, rank {a.rank}, "
             f"{a.world} ranks (rank 0)", "",
             "| optimizer | state per rank, measured | closed form | "
             "refresh step: collectives, payload | closed form | next step: collectives |",
             "|---|---|---|---|---|---|"]
    closed_state = {"adamw": adamw_state(numel + plain, a.world),
                    "exact": galore_state(shapes, plain, a.rank, a.world),
                    "randomized": galore_state(shapes, plain, a.rank, a.world)}
    for name, label in (("adamw", "torch AdamW"), ("exact", "GaLoreAdamW, svd=exact"),
                        ("randomized", "GaLoreAdamW, svd=randomized")):
        r = got[name]
        closed_ref = "-" if name == "adamw" else (
            f"{sum(refresh_bytes(m, n, a.rank, a.world, name) for m, n in shapes) / MB:.3f} MB")
        lines.append(f"| {label} | {r['state'] / MB:.3f} MB | {closed_state[name] / MB:.3f} MB | "
                     f"{r['refresh'][1]}, {r['refresh'][0] / MB:.3f} MB | {closed_ref} | "
                     f"{r['between'][1]} |")
    d, h, L, vocab = 4096, 11008, 32, 32000
    mats = block_shapes(d, h) * L
    plain7b = 2 * vocab * d + (2 * L + 1) * d
    total7b = sum(m * n for m, n in mats) + plain7b
    lines += ["", "## LLaMA-7B, closed form (per rank, GB; projected: attention and MLP)", "",
              "| ranks | torch AdamW | GaLore r=128 | r=512 | r=1024 |", "|---|---|---|---|---|"]
    for w in (8, 64):
        row = [adamw_state(total7b, w)] + [galore_state(mats, plain7b, r, w)
                                            for r in (128, 512, 1024)]
        lines.append(f"| {w} | " + " | ".join(f"{b / 2 ** 30:.2f}" for b in row) + " |")
    lines += ["", "## LLaMA-7B, one refresh per matrix, closed form (payload per rank, MB, "
              "8 ranks)", "", "| matrix | exact (all-gather) | randomized r=128 | r=512 |",
              "|---|---|---|---|"]
    for label, (m, n) in (("q/k/v/o 4096×4096", (d, d)), ("gate/up 11008×4096", (h, d)),
                          ("down 4096×11008", (d, h))):
        lines.append(f"| {label} | {refresh_bytes(m, n, 128, 8, 'exact') / MB:.1f} | "
                     f"{refresh_bytes(m, n, 128, 8, 'randomized') / MB:.1f} | "
                     f"{refresh_bytes(m, n, 512, 8, 'randomized') / MB:.1f} |")
    lines += ["", "## GaLoreAdamW8bit under FSDP2: do the 256-element blocks line up? "
              "(LLaMA-7B, rank 1024)", "", "| matrix | 8 ranks | 64 ranks |", "|---|---|---|"]
    for label, (m, n) in (("q/k/v/o 4096×4096", (d, d)), ("gate/up 11008×4096", (h, d)),
                          ("down 4096×11008", (d, h))):
        lines.append(f"| {label} | {blocks_line_up(m, n, 1024, 8)} | "
                     f"{blocks_line_up(m, n, 1024, 64)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
