"""MoFaSGD in a plain PyTorch training loop (copy this file; it needs only torch and mofasgd).

    pip install mofasgd            # or, from the mofa repo: pip install .
    python plain_loop.py

A small MLP learns a fixed random teacher network. The recipe is the paper's:
  * MoFaSGD (the paper's NanoGPT defaults) on the 2-D weight matrices;
  * AdamW on everything else (biases, norm gains; in a transformer also the embeddings and head);
  * BetaWarmup: MoFaSGD's beta goes 0.65 -> 0.85 over the first 300 steps (call step() per step);
  * the learning rate of both optimizers: flat, then a linear cooldown to 0 over the last 40%.
Prints the loss; exits with status 1 if training did not reduce it at least 20-fold.
"""

import torch
import torch.nn as nn

from mofasgd import BetaWarmup, MoFaSGD

STEPS = 300

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
model = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                      nn.Linear(128, 8))

matrices = [p for p in model.parameters() if p.ndim == 2]
others = [p for p in model.parameters() if p.ndim != 2]
mofasgd = MoFaSGD(matrices, rank=8)  # lr 0.05, eta1 0.25, max_value 5: the paper's values
adamw = torch.optim.AdamW(others, lr=3e-3, betas=(0.8, 0.95))
beta = BetaWarmup(mofasgd)  # 0.65 -> 0.85 over 300 steps, as in the paper


def cooldown(step, frac=0.4):
    return min(1.0, (STEPS - step) / (STEPS * frac))


schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, cooldown) for opt in (mofasgd, adamw)]

first = None
for step in range(STEPS):
    x = torch.randn(64, 32)
    with torch.no_grad():
        y = teacher(x)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if step % 50 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  loss {loss.item():.5f}  beta {mofasgd.param_groups[0]['beta']:.3f}  "
              f"lr {mofasgd.param_groups[0]['lr']:.4f}")
    for opt in (mofasgd, adamw):
        opt.step()
        opt.zero_grad(set_to_none=True)
    for sched in schedulers:
        sched.step()
    beta.step()
    first = loss.item() if first is None else first

final = loss.item()
print(f"loss {first:.5f} -> {final:.5f}")
raise SystemExit(0 if final < first / 20 else 1)
