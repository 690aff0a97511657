"""Stop (or skip) on a NaN/inf training loss before it reaches the weights or a checkpoint.

Lightning's own tools do not fit this job: `Trainer(detect_anomaly=True)` runs autograd anomaly
mode (several times slower) and reports the failing op, not the step; `EarlyStopping(
check_finite=True)` only looks at a logged metric when it validates, after the optimizer already
applied NaN gradients and after `ModelCheckpoint` may have saved the ruined weights as `last.ckpt`.

`NanGuard` checks the loss in `on_before_backward`, i.e. before any gradient exists:
- default: it raises `NonFiniteLossError` naming the step (the CLI prints it and exits 2). No
  optimizer step ran, so the weights are still the last good ones, and no checkpoint is written for
  that step: the last checkpoint on disk is the last good one, and the message names it.
- `skip: true`: the step's gradients are dropped (`grad = None`, so AdamW applies neither the update
  nor weight decay and keeps its moments) and training goes on; after `max_skips` skipped steps in
  one run it stops as above. The step counter and LR schedule still advance. With gradient
  accumulation the whole optimizer step is dropped (also its good micro-batches).
With `check_gradients` (default) it also stops/skips when the loss is finite but a gradient is not
(checked in `on_before_optimizer_step`, still before the update), except under fp16 loss scaling,
where inf gradients are expected and the GradScaler already skips those steps.
Under DDP the decision is all-reduced, so every rank stops or skips at the same step.

`lit_heads fit` adds a stopping guard by default; a `NanGuard` in the config replaces it.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_heads.errors import ConfigError, LitHeadsError

__all__ = ["DefaultNanGuard", "NanGuard", "NonFiniteLossError"]


class NonFiniteLossError(LitHeadsError, FloatingPointError):
    """The training loss (or a gradient) became NaN or infinite; the message names the step."""


class NanGuard(L.Callback):
    """Stop on a non-finite training loss naming the step, or skip such batches (`skip: true`)."""

    def __init__(self, skip: bool = False, max_skips: int = 10, check_gradients: bool = True):
        """
        Args:
            skip: drop the optimizer step of a batch with a non-finite loss and go on, instead of stopping.
            max_skips: with `skip`, stop anyway after this many skipped steps (a run that keeps producing
                NaN is broken, not unlucky).
            check_gradients: also catch a finite loss with non-finite gradients (not under fp16 loss scaling).
        """
        if max_skips < 0:
            raise ConfigError(f"NanGuard max_skips must be >= 0, got {max_skips}.")
        self.skip, self.max_skips, self.check_gradients = skip, max_skips, check_gradients
        self.skipped_steps: list[int] = []
        self._bad: str | None = None
        self._batch_idx = 0
        self.active = True

    # ---- the check ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, pl_module, loss):
        if not self.active:
            return
        value = loss.detach().float()
        finite = bool(torch.isfinite(value).all())
        if not _all_ranks(trainer, finite):
            what = (f"the training loss is {_fmt(value)}" if not finite
                    else "the training loss is not finite on another rank")
            self._handle(trainer, what)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.active:
            return
        if self._bad is None and self.check_gradients and getattr(trainer.precision_plugin, "scaler", None) is None:
            finite = _grads_finite(optimizer)
            if not _all_ranks(trainer, finite):
                self._handle(trainer, "the loss is finite but a gradient is NaN or infinite")
        if self._bad is not None:
            # grad None (not zero): torch optimizers skip such parameters entirely, so neither the
            # update nor weight decay nor the moment estimates move.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._bad = None

    def _handle(self, trainer, what: str) -> None:
        step = trainer.global_step
        where = f"step {step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if self.skip and len(self.skipped_steps) < self.max_skips:
            self.skipped_steps.append(step)
            self._bad = what
            rank_zero_warn(f"lit_heads: {what} at {where}; skipping this batch (NanGuard skip: true, "
                           f"{len(self.skipped_steps)} of at most {self.max_skips}).")
            return
        checkpoint = trainer.checkpoint_callback
        last = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint is not None else ""
        saved = (f" The last good checkpoint is {last}; resume from it with --ckpt_path {last}." if last
                 else " No checkpoint was written before it.")
        skipped = (f" {len(self.skipped_steps)} earlier steps were already skipped ({self.skipped_steps[:10]})."
                   if self.skipped_steps else "")
        raise NonFiniteLossError(
            f"Training stopped: {what} at {where}. No weight was changed by this step and no checkpoint of it "
            f"was written.{saved}{skipped} Lower the learning rate, set gradient_clip_val, check that batch's "
            f"data, or add lit_heads.callbacks.nan_guard.NanGuard with skip: true to skip such batches."
        )

    # ---- state: skipped steps survive a resume -------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = [int(s) for s in state_dict.get("skipped_steps", [])]


class DefaultNanGuard(NanGuard):
    """The stopping guard `lit_heads fit` always adds; it stands down when the config has its own
    `NanGuard` (e.g. with `skip: true`), so the two never disagree."""

    def setup(self, trainer, pl_module, stage):
        self.active = not any(isinstance(c, NanGuard) and not isinstance(c, DefaultNanGuard) for c in trainer.callbacks)


def _all_ranks(trainer, ok: bool) -> bool:
    if trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
    return ok


def _grads_finite(optimizer) -> bool:
    # One flag per tensor, reduced on-device: a single host sync per step, not one per tensor.
    flags = [torch.isfinite(p.grad).all() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not flags:
        return True
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())


def _fmt(value: torch.Tensor) -> str:
    v = float(value.flatten()[0]) if value.numel() else float("nan")
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else str(v)
