"""GaLore in 10 lines (the README's example), runnable on CPU in a few seconds.

    python examples/quickstart.py

A small autoencoder trained with ``GaLoreAdamW``: every 2-D weight's gradient is projected
onto a rank-32 subspace (refreshed by SVD every 200 steps) and Adam's moments live there.
"""
import torch

import lowrank_optim as lo

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
opt = lo.GaLoreAdamW(model.parameters(), lr=1e-2, rank=32, update_proj_gap=200, scale=0.25)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
for step in range(1000):
    x = torch.randn(64, 256)
    loss = (model(x) - x).square().mean()
    loss.backward(); opt.step(); opt.zero_grad(); sched.step()
    if step % 200 == 0 or step == 999:
        print(f"step {step:4d}  loss {loss.item():.4f}")

state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
            if torch.is_tensor(t))
adamw = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
print(f"optimizer state: {state / 2**20:.2f} MiB (AdamW would hold {adamw / 2**20:.2f} MiB)")
