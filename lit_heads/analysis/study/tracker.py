"""The callback of Finding 3: the pattern on fixed probe batches while the model trains."""

from __future__ import annotations

import lightning as L


class PatternTracker(L.Callback):
    """Records the pattern on fixed probe batches at step 0, every `every` steps and at the last step
    (Finding 3: how fast the pattern moves)."""

    def __init__(self, probe: list[dict], every: int):
        from lit_heads.heads.history import PatternHistory

        self.probe, self.every, self.history = probe, every, PatternHistory()

    def _record(self, trainer, pl_module) -> None:
        from lit_heads.heads.scoring import compute_ap

        if self.history.steps and self.history.steps[-1] == trainer.global_step:
            return
        self.history.append(trainer.global_step, compute_ap(pl_module.model, self.probe, progress=False).scores)

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(trainer, pl_module)
