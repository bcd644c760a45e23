"""Data-parallel training with DistributedDataParallel: GaLore, Q-GaLore or LoQT, normal or
per-layer stepping, gradient accumulation with ``no_sync``, a checkpoint from rank 0.

    torchrun --nproc_per_node=2 examples/ddp.py                     # GaLoreAdamW, opt.step()
    torchrun --nproc_per_node=2 examples/ddp.py --per_layer=1       # opt.register_hooks(ddp)
    torchrun --nproc_per_node=2 examples/ddp.py --method=q_galore --accumulate=2
    torchrun --nproc_per_node=2 examples/ddp.py --method=loqt --resume=1  # continue a run
    python examples/ddp.py                                          # one process, world of 1

Each rank trains on its own synthetic batches (predict a fixed random function of each
token and the one before it, a 4096-entry table); DDP
averages the gradients, so every rank computes the same basis and the same update. At
the end every rank's parameters and buffers are compared with rank 0's: the printed
max |Δ| is 0. Runs on CPU (gloo); ``--device=cuda`` uses one GPU per process (nccl).
"""
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lowrank_optim as lo
from _toy import Model, setup

# defaults, overridden by --key=value
method = "galore"  # galore | q_galore | loqt
per_layer = 0  # 1: opt.register_hooks(ddp_model), each parameter stepped after its all-reduce
accumulate = 1  # micro-batches per step; all but the last run under ddp.no_sync()
steps = 200
batch = 32  # per rank and micro-batch
rank_ = 16  # GaLore / LoQT rank
lr = 1e-2
device = "cpu"
ckpt = "ddp_example.pt"  # written by rank 0 at the end
resume = 0  # 1: every rank loads `ckpt` (weights_only) and continues from it

for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=")
    globals()[key] = type(globals()[key])(value)


def build(dev):
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
    model = Model()
    if method == "q_galore":
        lo.quantize_weights(model, bits=8, group_size=256, target_modules=("mlp",))
    elif method == "loqt":
        lo.prepare_loqt(model, rank=rank_, target_modules=("mlp",))
    model.to(dev)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if method == "loqt":  # B factors + plain AdamW for the rest
        opt = lo.LoQTAdamW(ddp.parameters(), lr=lr, update_proj_gap=50)
    else:
        cls = lo.QGaLoreAdamW8bit if method == "q_galore" else lo.GaLoreAdamW
        groups = lo.param_groups(model, rank=rank_, target_modules=("mlp",))
        opt = cls(groups, lr=lr, update_proj_gap=50, scale=1.0)
    return model, ddp, opt


def main() -> None:
    rank, world = setup(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    model, ddp, opt = build(dev)
    start = 0
    if resume:
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    if per_layer:
        opt.register_hooks(ddp)  # the DDP model, not model: steps after the all-reduce
    table = torch.randint(0, 64, (64, 64), generator=torch.Generator().manual_seed(0)).to(dev)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(start, start + steps):
        for micro in range(accumulate):
            tok = torch.randint(0, 64, (batch, 8), generator=gen).to(dev)
            with ddp.no_sync() if micro < accumulate - 1 else torch.enable_grad():
                target = table[tok, tok.roll(1, dims=-1)]
                loss = nn.functional.cross_entropy(ddp(tok).flatten(0, 1), target.flatten())
                (loss / accumulate).backward()
        if not per_layer:
            opt.step()
            opt.zero_grad()
        if rank == 0 and (step % 50 == 0 or step == start + steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

    diff = lo.distributed.replica_divergence(model)  # every parameter and buffer vs rank 0's
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "step": start + steps}, ckpt)
        print(f"{method}, {'per-layer' if per_layer else 'normal'} stepping, {world} ranks: "
              f"max |Δ(param, buffer)| across ranks = {diff:.3g}; saved {ckpt}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
