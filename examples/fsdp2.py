"""Sharded training with FSDP2 (``fully_shard``): GaLoreAdamW or GaLoreAdafactor on
sharded parameters, normal or per-layer stepping, a distributed checkpoint (DCP).

    torchrun --nproc_per_node=2 examples/fsdp2.py                    # GaLoreAdamW, opt.step()
    torchrun --nproc_per_node=2 examples/fsdp2.py --per_layer=1      # opt.register_hooks(model)
    torchrun --nproc_per_node=2 examples/fsdp2.py --svd=randomized   # distributed sketch
    torchrun --nproc_per_node=2 examples/fsdp2.py --resume=1         # continue from the checkpoint
    torchrun --nproc_per_node=1 examples/fsdp2.py --resume=1         # ... on another world size
    python examples/fsdp2.py                                         # one process, world of 1

Each block and the root are ``fully_shard``-ed with ``lowrank_optim.shard_placement_fn()``,
which shards each wide matrix on dim 1 so that every basis lies on an unsharded
dimension: between refreshes the optimizer sends one number per step (the ranks' shared
verdict on non-finite gradients). Each rank trains on its
own synthetic batches (the task of ``examples/ddp.py``). At the end the checkpoint is
written with ``torch.distributed.checkpoint`` (each rank its shards; the moments are
DTensors, so it loads on any number of ranks). Runs on CPU (gloo); ``--device=cuda`` uses
one GPU per process (nccl).
"""
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import lowrank_optim as lo
from _toy import Model, setup

# defaults, overridden by --key=value
method = "galore"  # galore | adafactor
per_layer = 0  # 1: opt.register_hooks(model), each parameter stepped after its reduce-scatter
svd = "exact"  # exact: gathers one layer's gradient at a refresh; randomized: sketches it
steps = 200
batch = 32  # per rank
rank_ = 16  # GaLore rank
lr = 1e-2
device = "cpu"
ckpt = "fsdp2_example_ckpt"  # a DCP directory, written at the end
resume = 0  # 1: load `ckpt` and continue from it

for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=")
    globals()[key] = type(globals()[key])(value)


def build(dev):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = Model().to(dev)
    place = lo.shard_placement_fn()  # wide matrices on dim 1: every basis unsharded
    for block in model.blocks:
        fully_shard(block, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    groups = lo.param_groups(model, rank=rank_, target_modules=("mlp",))
    cls = lo.GaLoreAdafactor if method == "adafactor" else lo.GaLoreAdamW
    opt = cls(groups, lr=lr, update_proj_gap=50, scale=1.0, svd=svd)
    return model, opt


def main() -> None:
    rank, world = setup(device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else \
        torch.device("cpu")
    model, opt = build(dev)
    start = 0
    if resume:  # the optimizer's state is created for DCP (no step taken, no basis yet)
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd, "step": 0}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = state["step"]
    if per_layer:
        opt.register_hooks(model)  # FSDP2 calls the hooks after each reduce-scatter
    table = torch.randint(0, 64, (64, 64), generator=torch.Generator().manual_seed(0)).to(dev)
    gen = torch.Generator().manual_seed(1000 + rank + 7919 * start)  # each rank its own data
    for step in range(start, start + steps):
        tok = torch.randint(0, 64, (batch, 8), generator=gen).to(dev)
        target = table[tok, tok.roll(1, dims=-1)]
        loss = nn.functional.cross_entropy(model(tok).flatten(0, 1), target.flatten())
        loss.backward()
        if not per_layer:
            opt.step()
            opt.zero_grad()
        if rank == 0 and (step % 50 == 0 or step == start + steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd, "step": start + steps}, checkpoint_id=ckpt)
    if rank == 0:
        print(f"{method} ({svd} SVD), {'per-layer' if per_layer else 'normal'} stepping, "
              f"{world} ranks; saved {ckpt}/")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
