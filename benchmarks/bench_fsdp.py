"""FSDP2: per-rank optimizer state and bytes communicated per refresh, measured on gloo
ranks and in closed form (docs/benchmarks.md).

    python benchmarks/bench_fsdp.py                       # 2 ranks on CPU (gloo), results/fsdp.md
    python benchmarks/bench_fsdp.py --layers=2 --out=/tmp/fsdp.md
"""
import socket

import common as C

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_optim as lo

F32, MB = 4, 2 ** 20
cdiv = lambda a, b: -(-a // b)  # noqa: E731
MATRICES_7B = (("q/k/v/o 4096×4096", (4096, 4096)), ("gate/up 11008×4096", (11008, 4096)),
               ("down 4096×11008", (4096, 11008)))
block_shapes = lambda d, h: [(d, d)] * 4 + [(h, d), (h, d), (d, h)]  # noqa: E731 - q k v o gate up down


def state_per_rank(shapes, plain: int, rank, world: int) -> int:
    """GaLoreAdamW: a replicated basis min(m,n)·r and 2 sharded moments max(m,n)·r per
    matrix; torch AdamW (``rank`` None): 2 sharded moments per element; plain: AdamW."""
    total = sum(2 * m * n / world if rank is None else
                min(m, n) * min(rank, m, n) + 2 * max(m, n) * min(rank, m, n) / world
                for m, n in shapes)
    return int(F32 * (total + 2 * plain / world))


def refresh_bytes(m: int, n: int, rank: int, world: int, svd: str) -> int:
    """Payload of one refresh's collectives for an m×n matrix (docs/benchmarks.md)."""
    if svd == "exact":
        return F32 * m * n
    q = min(min(rank, m, n) + 8, m, n)
    return F32 * (2 * world * q * q + 2 * q * (n if m >= n else m))


def blocks_line_up(m: int, n: int, rank: int, world: int, block: int = 256) -> str:
    """Are GaLoreAdamW8bit's moment blocks the single-process ones, split whole?"""
    if m < n:  # left basis: sharded on dim 1, each rank holds r×(n/W): rows interleave
        return "no (columns split: a rank's slice is not contiguous in the moment)"
    r, rows = min(rank, m, n), cdiv(m, world)
    if rows * r % block == 0 and cdiv(cdiv(m * r, block), world) == rows * r // block:
        return f"yes ({rows * r // block} blocks per rank)"
    return f"no ({rows} rows × {r} = {rows * r} elements per rank)"


class Block(nn.Module):
    """LLaMA-shaped matrices and a norm weight on 2-D inputs: only the shapes matter."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = (nn.Linear(i, o, bias=False) for i, o in
                                         ((d, h), (d, h), (h, d)))
        self.norm = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x * self.norm
        a = self.o(torch.softmax(self.q(x) @ self.k(x).T / x.shape[1] ** 0.5, -1) @ self.v(x))
        return x + a + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Payload(TorchDispatchMode):
    """Collectives dispatched and their payload (all-gather: output; all-reduce: tensors)."""
    bytes = ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func.namespace in ("c10d", "_c10d_functional") and "wait" not in name \
                and "wrap" not in name:
            self.ops += 1
            if "all_gather_into_tensor" in name:  # functional: (input, group size, group)
                self.bytes += C.tensor_bytes(args[0]) * args[1]
            elif "allgather_base" in name:  # c10d: (output, input, ...)
                self.bytes += C.tensor_bytes(args[0])
            elif "allreduce" in name:  # c10d: ([tensors], ...)
                self.bytes += sum(map(C.tensor_bytes, args[0]))
        return func(*args, **(kwargs or {}))


def worker(rank: int, port: int, a, out: dict) -> None:
    """Each optimizer on a fresh sharded stack, 2 steps; every matrix refreshes at the first."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=a.world)
    for name in ("adamw", "exact", "randomized"):
        torch.manual_seed(0)
        model = nn.Sequential(*(Block(a.width, a.hidden) for _ in range(a.layers)))
        for block in model:
            fully_shard(block, shard_placement_fn=lo.shard_placement_fn())
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "adamw" else \
            lo.GaLoreAdamW(model.parameters(), lr=1e-3, rank=a.rank, svd=name, stagger=False)
        x = torch.randn(16, a.width, generator=torch.Generator().manual_seed(rank))
        steps = []
        for _ in range(2):
            model(x).square().mean().backward()
            with Payload() as p:
                opt.step()
            opt.zero_grad()
            steps.append((p.bytes, p.ops))
        state = sum(C.tensor_bytes(v.to_local() if lo.fsdp.is_sharded(v) else v)  # local shard
                    for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        if rank == 0:
            out[name] = dict(state=state, refresh=steps[0], between=steps[1])
    dist.destroy_process_group()


def main(argv=None) -> None:
    a = C.parser(__doc__, layers=2, width=256, hidden=688, rank=32, world=2,
                 out="benchmarks/results/fsdp.md").parse_args(argv)
    shapes, plain = block_shapes(a.width, a.hidden) * a.layers, a.width * a.layers
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    got = mp.Manager().dict()
    mp.start_processes(worker, args=(port, a, got), nprocs=a.world, start_method="fork")
    refresh = lambda svd: sum(refresh_bytes(m, n, a.rank, a.world, svd) for m, n in shapes)  # noqa: E731
    rows = [[label, f"{got[k]['state'] / MB:.3f} MB", f"{closed / MB:.3f} MB",
             f"{got[k]['refresh'][1]}, {got[k]['refresh'][0] / MB:.3f} MB",
             "-" if k == "adamw" else f"{refresh(k) / MB:.3f} MB", got[k]["between"][1]]
            for k, label, closed in (
                ("adamw", "torch AdamW", state_per_rank(shapes, plain, None, a.world)),
                ("exact", "GaLoreAdamW, svd=exact", state_per_rank(shapes, plain, a.rank, a.world)),
                ("randomized", "GaLoreAdamW, svd=randomized",
                 state_per_rank(shapes, plain, a.rank, a.world)))]
    mats = block_shapes(4096, 11008) * 32                # LLaMA-7B: 32 blocks, vocabulary 32000,
    plain7b = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096    # embedding, head and 65 norms plain
    body = "\n\n".join([
        f"## Measured: {a.layers} blocks, d={a.width}, h={a.hidden}, rank {a.rank}, "
        f"{a.world} ranks (rank 0)",
        C.md_table(["optimizer", "state per rank, measured", "closed form",
                    "refresh step: collectives, payload", "closed form",
                    "next step: collectives"], rows),
        "## LLaMA-7B, closed form (per rank, GB; projected: attention and MLP)",
        C.md_table(["ranks", "torch AdamW", "GaLore r=128", "r=512", "r=1024"], [
            [w] + [f"{state_per_rank(mats, plain7b, r, w) / 2 ** 30:.2f}"
                   for r in (None, 128, 512, 1024)] for w in (8, 64)]),
        "## LLaMA-7B, one refresh per matrix, closed form (payload per rank, MB, 8 ranks)",
        C.md_table(["matrix", "exact (all-gather)", "randomized r=128", "r=512"], [
            [label] + [f"{refresh_bytes(m, n, r, 8, svd) / MB:.1f}" for r, svd in
                       ((128, "exact"), (128, "randomized"), (512, "randomized"))]
            for label, (m, n) in MATRICES_7B]),
        "## GaLoreAdamW8bit under FSDP2: do the 256-element blocks line up? "
        "(LLaMA-7B, rank 1024)",
        C.md_table(["matrix", "8 ranks", "64 ranks"], [
            [label] + [blocks_line_up(m, n, 1024, w) for w in (8, 64)]
            for label, (m, n) in MATRICES_7B])])
    print(C.write_report(a.out, "bench_fsdp: FSDP2 optimizer state and refresh communication",
                         C.report_meta("bench_fsdp.py", argv,
                                       f"cpu, gloo, {a.world} ranks, 1 torch thread each"), body))


if __name__ == "__main__":
    main()
