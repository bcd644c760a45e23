"""Each method's layer goes back to a plain ``nn.Linear`` (``lo.to_plain``).

After training with INT8 weights (Q-GaLore) or LoQT layers, ``to_plain`` gives an
ordinary model: its ``state_dict()`` has the original float model's keys and shapes, a
fresh float model loads it (``weights_only=True``) and computes what the trained one did.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from registry import generator

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.attn = nn.Linear(32, 48)
        self.mlp = nn.Linear(48, 32, bias=False)
        self.head = nn.Linear(32, 16)

    def forward(self, tok):
        h = self.embed(tok)
        return self.head(h + self.mlp(torch.tanh(self.attn(h))))


def _train(model, opt, steps=8):
    g = generator(0)
    for _ in range(steps):
        tok = torch.randint(0, 16, (8, 5), generator=g)
        nn.functional.cross_entropy(model(tok).flatten(0, 1), tok.flatten()).backward()
        opt.step()
        opt.zero_grad()


def _prepared(method):
    torch.manual_seed(0)
    model = Net()
    if method == "int8":
        lo.quantize_weights(model, bits=8, group_size=64)
        opt = lo.QGaLoreAdamW8bit(lo.param_groups(model, rank=4), lr=1e-2, update_proj_gap=3,
                                  min_8bit_size=64, proj_group_size=32)
    else:
        lo.prepare_loqt(model, rank=4, proj_group_size=32)
        opt = lo.LoQTAdamW(model.parameters(), lr=1e-2, update_proj_gap=3)
    _train(model, opt)
    return model


@pytest.mark.parametrize("method", ["int8", "loqt"])
def test_to_plain_computes_what_the_trained_model_does(method):
    model = _prepared(method)
    tok = torch.randint(0, 16, (4, 5), generator=generator(1))
    with torch.no_grad():
        expected = model(tok)
    plain = lo.to_plain(copy.deepcopy(model))
    assert not any(hasattr(m, "to_linear") for m in plain.modules())
    assert type(plain.attn) is nn.Linear and type(plain.mlp) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(tok), expected, rtol=1e-5, atol=1e-5)
    # an ordinary checkpoint: the float model's keys and shapes, loadable weights-only
    sd = plain.state_dict()
    ref = Net().state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = Net()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tok), expected, rtol=1e-5, atol=1e-5)


def test_to_plain_of_a_single_layer_and_dtype():
    torch.manual_seed(0)
    q = lo.QuantLinear.from_linear(nn.Linear(8, 4), bits=8, group_size=16)
    lin = lo.to_plain(q, dtype=torch.bfloat16)
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.bfloat16
    torch.testing.assert_close(lin.weight.float(), q.dequantized_weight().bfloat16().float())
