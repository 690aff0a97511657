"""Watch the attention-head activation pattern (AP) evolve while a model trains."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_heads.callbacks.lora import unwrap_peft
from lit_heads.errors import ConfigError
from lit_heads.heads import stats
from lit_heads.heads.history import PatternHistory
from lit_heads.heads.pattern import Pattern, heatmap
from lit_heads.heads.scoring import HeadGateCapture, compute_ap, per_sample_scale
from lit_heads.module import loss_chunk_size
from lit_heads.run_folder import HEADS, output_dir


class HeadActivationMonitor(L.Callback):
    """Compute the AP on a fixed probe set at fit start, every `every_n_steps` optimizer steps and at
    fit end; log the heatmap, concentration statistics (Gini, CV, entropy), the change against the
    step-0 and the previous pattern (MSE, Pearson) and the top-k overlap with the previous ranking.

    The whole history lives in one file (`<dirpath>/ap_history.safetensors`) and in the checkpoint,
    so a resumed run continues it. With `free=True` it also accumulates the AP of the training
    batches from their own backward pass (no extra forward/backward), logged as `heads_free/*`.
    """

    def __init__(
        self,
        every_n_steps: int = 20,
        probe: str = "val",
        probe_size: int = 32,
        probe_format: str = "auto",
        free: bool = False,
        top_k: int = 10,
        log_table: bool = True,
        dirpath: str | None = None,
    ):
        """
        Args:
            every_n_steps: optimizer steps between two probe patterns.
            probe: 'val' or 'train' (the first `probe_size` examples of the DataModule's split), or a
                data file / 'generated:<task>' source.
            probe_size: number of probe samples.
            probe_format: record format of a probe file (auto-detected by default).
            free: also accumulate the AP of the training batches from their own backward pass.
            top_k: size of the head rankings compared between patterns.
            log_table: log the long-format (step, layer, head, score, rank) table to the loggers.
            dirpath: where the history, heatmaps and plots go; default `<trainer.default_root_dir>/heads`.
        """
        if every_n_steps < 1:
            raise ConfigError(f"HeadActivationMonitor every_n_steps must be >= 1, got {every_n_steps}.")
        if probe_size < 1:
            raise ConfigError(f"HeadActivationMonitor probe_size must be >= 1, got {probe_size}: the probe set would "
                              "be empty.")
        self.every_n_steps, self.probe, self.probe_size, self.probe_format = (every_n_steps, probe, probe_size,
                                                                              probe_format)
        self.free, self.top_k, self.log_table, self.dirpath = free, top_k, log_table, dirpath
        self.history = PatternHistory()
        self._probe_batches: list[dict] = []
        self._capture: HeadGateCapture | None = None
        self._free_sum: torch.Tensor | None = None
        self._free_count = 0
        self._labels: torch.Tensor | None = None

    # ---- setup --------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        self.out_dir = output_dir(trainer, self.dirpath, HEADS)

    def on_fit_start(self, trainer, pl_module):
        batches = list(self._probe_loader(trainer.datamodule))
        # Each rank scores its own share; compute_ap all-reduces, so the result is the AP of the union.
        self._probe_batches = batches[trainer.global_rank :: trainer.world_size]

    def on_train_start(self, trainer, pl_module):
        # The baseline pattern, once per run: a resumed run has it from the checkpoint already, and
        # recording at the resume step would make its history differ from an uninterrupted run's.
        if not self.history.steps:
            self.record(trainer, pl_module)

    def _probe_loader(self, datamodule):
        if datamodule is None:
            raise ConfigError("HeadActivationMonitor needs a DataModule (data: in the config) to build its probe set.")
        if self.probe in ("val", "train"):
            examples = (datamodule.val_examples if self.probe == "val"
                        else datamodule.train_examples)[: self.probe_size]
        else:
            from lit_heads.data import load_source

            examples = load_source(self.probe, size=self.probe_size, seed=datamodule.seed,
                                   format=self.probe_format)[: self.probe_size]
        if not examples:
            raise ConfigError(
                f"HeadActivationMonitor probe '{self.probe}' has no samples. Give a non-empty validation set "
                f"(val_size > 0 or val_split > 0), probe: train, or a probe file."
            )
        return datamodule.make_dataloader(examples)

    # ---- the probe pattern --------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None
        step = trainer.global_step
        if step % self.every_n_steps == 0 and (not self.history.steps or self.history.steps[-1] != step):
            self.record(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if not self.history.steps or self.history.steps[-1] != trainer.global_step:
            self.record(trainer, pl_module)
        if trainer.is_global_zero and len(self.history) > 1:
            path = self.history.plot_statistics(self.out_dir / "ap_statistics.png", top_k=self.top_k)
            self._log_image(trainer, "heads/statistics", path)
            rank_zero_info(f"lit_heads: activation-pattern history in {self.out_dir}")

    def record(self, trainer, pl_module) -> Pattern:
        step = trainer.global_step
        pattern = compute_ap(unwrap_peft(pl_module.model), self._probe_batches, progress=False,
                             meta={"step": step, "data": f"probe:{self.probe}"},
                             loss_chunk_size=loss_chunk_size(pl_module))
        metrics = self.history.append(step, pattern.scores, top_k=self.top_k)
        free = self._reduce_free(trainer, pattern.scores.shape) if self.free else None
        if trainer.is_global_zero:
            if free is not None:
                self._log(trainer, {f"heads_free/{k}": v for k, v in stats.summary(free).items()}, step)
            self.history.save(self.out_dir / "ap_history.safetensors",
                              meta={"probe": self.probe, "probe_size": self.probe_size})
            image = heatmap(pattern, self.out_dir / f"ap_step{step:06d}.png", title=f"activation pattern, step {step}")
            self._log(trainer, {f"heads/{k}": v for k, v in metrics.items()}, step)
            self._log_image(trainer, "heads/heatmap", image)
            if self.log_table:
                self._log_rows(trainer, step, pattern.scores)
        return pattern

    # ---- the free pattern, from the training backward -----------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.free:
            self._labels = batch["labels"]
            self._capture = HeadGateCapture(unwrap_peft(pl_module.model)).__enter__()

    def on_after_backward(self, trainer, pl_module):
        if self._capture is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = per_sample_scale(
            self._labels, loss_scale=float(scaler.get_scale()) if scaler is not None else 1.0,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
        )
        scores = self._capture.pop(scale=scale.to(self._labels.device))
        if scores is not None and not torch.isnan(scores).any():
            batch_sum = scores.abs().sum(0).double().cpu()
            self._free_sum = batch_sum if self._free_sum is None else self._free_sum + batch_sum
            self._free_count += scores.shape[0]

    def _reduce_free(self, trainer, shape) -> torch.Tensor | None:
        """The free AP since the last record, over the training samples of every rank (a collective)."""
        local = self._free_sum if self._free_sum is not None else torch.zeros(shape, dtype=torch.float64)
        packed = torch.cat([local.flatten(), torch.tensor([float(self._free_count)], dtype=torch.float64)])
        packed = trainer.strategy.reduce(packed.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        self._free_sum, self._free_count = None, 0
        count = int(packed[-1])
        return (packed[:-1] / count).view(shape).float() if count else None

    # ---- logging and state --------------------------------------------------------------------
    @staticmethod
    def _log(trainer, metrics: dict, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    def _log_image(trainer, key: str, path: Path) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(path)], step=trainer.global_step)

    @staticmethod
    def _log_rows(trainer, step: int, scores: torch.Tensor) -> None:
        rows = PatternHistory.long_rows(step, scores)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="heads/ap_table", columns=["step", "layer", "head", "score", "rank"], data=rows,
                                 step=step)

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.history.load_state_dict(state_dict)
