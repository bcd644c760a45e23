"""The toy model and process-group setup shared by ``ddp.py`` and ``fsdp2.py``."""
import os
import socket

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, h):
        return h + self.mlp(self.norm(h))


class Model(nn.Module):
    """Embeddings of each token and of the one before it, two residual MLP blocks (their
    ``mlp`` Linears are the low-rank ones), a head."""

    def __init__(self, vocab: int = 64, d: int = 128, hidden: int = 512):
        super().__init__()
        self.embed, self.embed_prev = nn.Embedding(vocab, d), nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d, hidden), Block(d, hidden))
        self.head = nn.Linear(d, vocab)

    def forward(self, tok):
        return self.head(self.blocks(self.embed(tok) + self.embed_prev(tok.roll(1, dims=-1))))


def setup(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes (plain ``python``: a world of one);
    returns (rank, world size)."""
    if "RANK" not in os.environ:  # plain `python examples/<name>.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]),
                              RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size()
