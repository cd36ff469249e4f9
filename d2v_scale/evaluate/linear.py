"""Linear probe on frozen features (MAE `main_linprobe.py`): BatchNorm without affine + Linear (trunc-
normal 0.01), cross-entropy, lr = 0.1 x batch / 256, warmup then half-cycle cosine per iteration, no weight
decay, 90 epochs (10 warmup); SGD with momentum where MAE's 16,384 batches use LARS. Seeded; the global
RNG is left as it was.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, num_classes: int,
                 epochs: int = 90, batch_size: int = 256, blr: float = 0.1, warmup_epochs: int = 10,
                 seed: int = 0) -> torch.Tensor:
    """Features (N, D) with labels (N,) -> class scores (V, C) for val_x (V, D)."""
    device = train_x.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                             nn.Linear(train_x.shape[1], num_classes)).to(device)
        nn.init.trunc_normal_(head[1].weight, std=0.01)
        nn.init.zeros_(head[1].bias)
        batch_size = min(batch_size, train_x.shape[0])
        lr = blr * batch_size / 256
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        steps_per_epoch = max(1, train_x.shape[0] // batch_size)
        total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
        gen = torch.Generator().manual_seed(seed)
        step = 0
        for _ in range(epochs):
            order = torch.randperm(train_x.shape[0], generator=gen).to(device)
            for b in range(steps_per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                t = step / max(1, warmup) if step < warmup else \
                    0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
                for g in opt.param_groups:
                    g["lr"] = lr * t
                loss = F.cross_entropy(head(train_x[idx].float()), train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        head.eval()
        with torch.no_grad():
            return head(val_x.float().to(device))                                   # (V, C)
