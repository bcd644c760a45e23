"""``torch.compile`` of every layer of the package computes what eager computes.

Two tiny models hold every layer type: LoQT layers in each storage (NF4 ``Q``, integer
``Q`` of 4 and 8 bits, unquantized), and Q-GaLore's INT8 ``QuantLinear``, LR-QAT's
``LRQATLinear`` (both ``phi0`` storages) and its exported ``IntLinear``. Each model is
trained eagerly and compiled (inductor, default mode, ``fullgraph=True``: a graph break
in a layer's forward or backward fails the test) on the same batches; losses and
gradients are compared at every step, across several LoQT merges, and no step after the
first compiles again (a merge changes no guard); then an evaluation under
``torch.no_grad``. Compilation takes a few seconds per model on two CPU cores.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim import quant
from lowrank_optim.lr_qat import LRQATLinear
from registry import backward_compiled_and_eager, generator, loss_fn, make_batches

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 6


class Chain(nn.Module):
    """Embedding(10, 16) + 16 -> 32 -> 24 -> 24 -> 8, tanh between: tall and wide layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 24)
        self.l3, self.l4 = nn.Linear(24, 24), nn.Linear(24, 8)

    def forward(self, tok, x):
        h = x + self.emb(tok)
        for layer in (self.l1, self.l2, self.l3):
            h = torch.tanh(layer(h))
        return self.l4(h)


def _loqt():
    torch.manual_seed(0)
    m = Chain()
    for name, kw in (("l1", dict(bits=4)), ("l2", dict(bits=4, quant_type="int")),
                     ("l3", dict(bits=8, quant_type="int")),
                     ("l4", dict(bits=None, proj_bits=None))):
        lo.prepare_loqt(m, rank=4, target_modules=(name,), proj_group_size=32, **kw)
    # merges at steps 0, then 1 or 2 (staggered), then every 3 or 4 steps
    return m, lo.LoQTAdamW(m.parameters(), lr=1e-2, update_proj_gap=2)


def _others():
    torch.manual_seed(0)
    m = Chain()
    lo.quantize_weights(m, bits=8, group_size=64, target_modules=("l1",))
    m.l2 = LRQATLinear.from_linear(m.l2, bits=4, rank=4, group_size=8)
    m.l3 = LRQATLinear.from_linear(m.l3, bits=4, rank=4, storage="int4x2")
    m.l4 = LRQATLinear.from_linear(m.l4, bits=4, rank=4).to_int_linear()
    rest = [p for n, p in m.named_parameters() if n != "l1.weight"]
    opt = lo.QGaLoreAdamW8bit([{"params": [m.l1.weight], "rank": 4},
                               {"params": rest, "rank": None}], lr=1e-2, update_proj_gap=2,
                              min_8bit_size=64, proj_group_size=32)
    return m, opt


@pytest.mark.parametrize("make", [_loqt, _others], ids=["loqt", "qgalore_lrqat_int"])
def test_compiled_training_matches_eager(make):
    torch._dynamo.reset()
    (eager, o1), (model, o2) = make(), make()
    compiled = torch.compile(model, fullgraph=True)
    for t, batch in enumerate(make_batches(STEPS)):
        backward_compiled_and_eager(compiled, eager, t, batch)  # no recompile at merges
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-6, msg=name)
        for opt in (o1, o2):
            opt.step()
            opt.zero_grad()
    merges = [(int(a.merges), int(b.merges)) for a, b in zip(eager.modules(), model.modules())
              if isinstance(a, lo.LoQTLinear)]
    assert all(a == b >= 2 for a, b in merges), merges  # across merges, the same ones
    with torch.no_grad():  # evaluation (nanoGPT's estimate_loss): a graph of its own
        torch.testing.assert_close(loss_fn(compiled, batch), loss_fn(eager, batch),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("numel, block", [(96, 32), (101, 64), (7, 64)])
def test_nf4_dequantize_is_bitsandbytes_bit_for_bit(numel, block):
    """The plain-torch NF4 dequantization (which traces under torch.compile) equals
    bitsandbytes' kernel, with the same code book, also for a short last block."""
    import bitsandbytes.functional as bnbf

    assert torch.tensor(quant.NF4_CODE).tolist() == bnbf.get_4bit_type("nf4", device="cpu").tolist()
    x = torch.randn(numel, generator=generator(0))
    q = quant.nf4_quantize(x, block)
    state = bnbf.QuantState(absmax=q.scale, shape=torch.Size([numel]), dtype=torch.float32,
                            blocksize=block, quant_type="nf4",
                            code=bnbf.get_4bit_type("nf4", device=x.device))
    ref = bnbf.dequantize_4bit(q.codes.reshape(-1, 1), state).reshape(-1)
    assert torch.equal(quant.dequantize(q), ref)
