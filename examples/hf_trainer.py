"""lowrank_optim with the Hugging Face ``Trainer``, offline, on CPU.

    python examples/hf_trainer.py                      # GaLoreAdamW, 200 steps
    python examples/hf_trainer.py --method loqt --steps 50
    python examples/hf_trainer.py --method qgalore --per-layer

A small ``LlamaForCausalLM`` (built from a config, randomly initialised) learns the Python
standard library's own source as bytes (found through ``sysconfig``; nothing is
downloaded). The optimizer and its LR schedule are handed to the ``Trainer`` as
``optimizers=(opt, scheduler)``; everything else is the ``Trainer``'s usual loop. With
``--per-layer`` the optimizer steps inside backward (``opt.register_hooks(model)``); the
Trainer's own ``optimizer.step()`` then finds no gradients and does nothing, and its
gradient clipping is switched off (``max_grad_norm=0``) because it cannot apply there.

Needs ``transformers`` and ``accelerate`` (``pip install transformers accelerate``); without
them the script says so and exits.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

import lowrank_optim as lo

TARGETS = ("self_attn", "mlp")  # the attention and MLP Linears of a Hugging Face Llama


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of ``seq_len`` bytes from the stdlib sources, deterministic."""

    def __init__(self, seq_len: int = 128, max_bytes: int = 2_000_000):
        root = Path(sysconfig.get_paths()["stdlib"])
        data = bytearray()
        for path in sorted(root.glob("*.py")):
            data += path.read_bytes()
            if len(data) >= max_bytes:
                break
        self.data = torch.tensor(list(data[:max_bytes]), dtype=torch.long)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.data) // self.seq_len - 1

    def __getitem__(self, i: int) -> dict:
        x = self.data[i * self.seq_len:(i + 1) * self.seq_len]
        return {"input_ids": x, "labels": x.clone()}  # the model shifts the labels itself


def build(method: str, rank: int, lr: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    if method == "galore":
        opt = lo.GaLoreAdamW(lo.param_groups(model, rank=rank, target_modules=TARGETS), lr=lr,
                             update_proj_gap=50, scale=0.25)
    elif method == "qgalore":
        lo.quantize_weights(model, bits=8, group_size=256, target_modules=TARGETS)
        opt = lo.QGaLoreAdamW8bit(lo.param_groups(model, rank=rank, target_modules=TARGETS),
                                  lr=lr, update_proj_gap=50, scale=0.25)
    elif method == "loqt":
        lo.prepare_loqt(model, rank=rank, bits=4, target_modules=TARGETS, scale=0.25)
        opt = lo.LoQTAdamW(model.parameters(), lr=lr, update_proj_gap=50)
    else:
        raise ValueError(f"unknown method {method!r}: galore, qgalore or loqt")
    return model, opt


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="galore", choices=("galore", "qgalore", "loqt"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--per-layer", action="store_true", help="opt.register_hooks(model)")
    a = ap.parse_args(argv)
    try:
        from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup
        import accelerate  # noqa: F401  (the Trainer needs it)
    except ImportError as exc:
        print(f"this example needs transformers and accelerate ({exc}); "
              "pip install transformers accelerate")
        return float("nan")

    model, opt = build(a.method, a.rank, a.lr)
    sched = get_cosine_schedule_with_warmup(opt, max(1, a.steps // 10), a.steps)
    if a.per_layer:
        opt.register_hooks(model)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=8,
                                 logging_steps=max(1, a.steps // 5), save_strategy="no",
                                 report_to=[], use_cpu=True, seed=0,
                                 max_grad_norm=0.0 if a.per_layer else 1.0)
        trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(),
                          optimizers=(opt, sched))
        result = trainer.train()
    print(f"{a.method}: final training loss {result.training_loss:.4f} after {a.steps} steps")
    return result.training_loss


if __name__ == "__main__":
    main()
    sys.exit(0)
