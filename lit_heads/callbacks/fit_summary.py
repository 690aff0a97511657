"""Measure the model before and after fit on the same validation data, and say where everything went."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_heads.atomic import atomic_write_text
from lit_heads.callbacks.export import ExportHF
from lit_heads.module import response_loss


class FitSummary(L.Callback):
    """At fit start and fit end: validation loss (token-averaged over the whole validation set) and
    generation accuracy on the first `num_generate` validation prompts. Prints a summary with the run,
    checkpoint and export locations, and writes it to `<log dir>/fit_summary.json`."""

    def __init__(self, num_generate: int | None = None):
        """
        Args:
            num_generate: prompts for the accuracy check; default: the module's `num_generate`.
        """
        self.num_generate = num_generate
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module):
        self.before = self.measure(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        self.after = self.measure(trainer, pl_module)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank
        if trainer.is_global_zero:
            summary = self.summary(trainer, log_dir)
            rank_zero_info(format_summary(summary))
            log_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(log_dir / "fit_summary.json", json.dumps(summary, indent=2))

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, float]:
        datamodule = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        total, tokens = 0.0, 0
        for batch in datamodule.val_dataloader():
            batch = {k: v.to(pl_module.device) for k, v in batch.items()}
            with trainer.precision_plugin.forward_context():
                logits = pl_module(batch["input_ids"], batch["attention_mask"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(response_loss(logits, batch["labels"])) * n
            tokens += n
        pl_module.train(was_training)
        loss = total / max(tokens, 1)
        result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
        n_gen = pl_module.hparams.num_generate if self.num_generate is None else self.num_generate
        if n_gen and hasattr(datamodule, "generation_examples"):
            correct, count, _ = pl_module.generation_accuracy(datamodule, n_gen)
            result.update(val_acc=correct / max(count, 1), val_acc_n=count)
        return result

    def summary(self, trainer, log_dir: Path) -> dict:
        checkpoint = trainer.checkpoint_callback
        export = next((c for c in trainer.callbacks if isinstance(c, ExportHF)), None)
        logger = trainer.logger
        return {
            "steps": trainer.global_step,
            "before": self.before,
            "after": self.after,
            **{key: _absolute(path) for key, path in (
                ("log_dir", log_dir),
                ("wandb_run", getattr(logger, "run_dir", None)),
                ("checkpoint", (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else None),
                ("export", export.target if export else None),
            )},
        }


def _absolute(path) -> str | None:
    return str(Path(path).resolve()) if path else None


def format_summary(s: dict) -> str:
    b, a = s["before"], s["after"]
    lines = ["", "lit_heads fit summary", f"  steps           {s['steps']}"]
    lines.append(f"  val loss        {b['val_loss']:.4f} -> {a['val_loss']:.4f}")
    if "val_acc" in a:
        lines.append(f"  val accuracy    {b['val_acc']:.3f} -> {a['val_acc']:.3f}  (greedy, {a['val_acc_n']} prompts)")
    for key, label in (("log_dir", "run folder"), ("wandb_run", "W&B run"), ("checkpoint", "checkpoint"), ("export", "HF export")):
        lines.append(f"  {label:<15} {s.get(key) or '-'}")
    return "\n".join(lines)
