"""Optimizer and learning-rate schedule defaults, overridable from YAML the LightningCLI way:

    model:
      optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 2.0e-4, weight_decay: 0.01}}
      scheduler: {class_path: lit_heads.optim.WarmupCosine, init_args: {warmup_steps: 10}}
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def default_adamw(params) -> torch.optim.Optimizer:
    """AdamW(lr=2e-4, weight_decay=0.01): the SFT default when the config names no optimizer."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)


class WarmupCosine(LambdaLR):
    """Linear warmup to the optimizer's lr over `warmup_steps`, then cosine decay to
    `min_lr_ratio * lr` at `total_steps`. `total_steps=None` means "the Trainer's estimated number of
    optimizer steps", filled in by the module before training starts."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 10, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = self.total_steps or (step + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
