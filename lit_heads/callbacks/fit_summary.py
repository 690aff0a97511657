"""Measure the model before and after fit on the same validation data, and say where everything went."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_heads.atomic import atomic_write_text
from lit_heads.callbacks.export import ExportHF
from lit_heads.run_folder import FIT_SUMMARY, NO_ACCURACY, run_root


class FitSummary(L.Callback):
    """At fit start and fit end: the validation loss (the module's `val/loss`: token-weighted over the
    whole validation set) and generation accuracy on the first `num_generate` validation prompts.
    Prints a summary with the run, checkpoint and export locations, and writes it to
    `<trainer.default_root_dir>/fit_summary.json`. "before" is the start of the run: it is kept in
    checkpoints, so a resumed run reports the weights it started from, not the resumed ones."""

    def __init__(self, num_generate: int | None = None):
        """
        Args:
            num_generate: prompts for the accuracy check; default: the module's `num_generate`.
        """
        self.num_generate = num_generate
        self.before: dict[str, float | int | None] = {}
        self.after: dict[str, float | int | None] = {}
        self._resumed = False

    def on_fit_start(self, trainer, pl_module):
        # A resumed run's checkpoint restored `before` (load_state_dict runs before on_fit_start).
        if not self._resumed:
            self.before = self.measure(trainer, pl_module)
        self._resumed = False

    def on_fit_end(self, trainer, pl_module):
        self.after = self.measure(trainer, pl_module)
        if trainer.is_global_zero:
            root = run_root(trainer)
            summary = self.summary(trainer, root)
            rank_zero_info(format_summary(summary))
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / FIT_SUMMARY, json.dumps(summary, indent=2))

    def measure(self, trainer, pl_module) -> dict[str, float | int | None]:
        """val_loss and val_ppl as `val/loss` and `val/ppl` define them; val_acc (None when no prompt has a
        gradable answer) and val_acc_n, the number of graded prompts."""
        datamodule = trainer.datamodule
        loss = pl_module.evaluate_loss(datamodule.val_dataloader())
        result: dict[str, float | int | None] = {"val_loss": loss,
                                                 "val_ppl": math.exp(loss) if loss < 709 else math.inf}
        n_gen = pl_module.hparams.num_generate if self.num_generate is None else self.num_generate
        if n_gen and hasattr(datamodule, "generation_examples"):
            correct, count, _ = pl_module.generation_accuracy(datamodule, n_gen)
            result.update(val_acc=correct / count if count else None, val_acc_n=count)
        return result

    def state_dict(self) -> dict:
        return {"before": dict(self.before)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("before"):
            self.before, self._resumed = dict(state_dict["before"]), True

    def summary(self, trainer, root: Path) -> dict:
        checkpoint = trainer.checkpoint_callback
        export = next((c for c in trainer.callbacks if isinstance(c, ExportHF)), None)
        logger = trainer.logger
        return {
            "steps": trainer.global_step,
            "before": self.before,
            "after": self.after,
            **{key: _absolute(path) for key, path in (
                ("log_dir", root),
                ("wandb_run", getattr(logger, "run_dir", None)),
                ("checkpoint", (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else None),
                ("export", export.target if export else None),
            )},
        }


def _absolute(path) -> str | None:
    return str(Path(path).resolve()) if path else None


def format_accuracy(before: dict, after: dict) -> str:
    """'0.000 -> 0.562  (greedy, 16 prompts)', or NO_ACCURACY when no prompt had a gradable answer."""
    if not after.get("val_acc_n"):
        return NO_ACCURACY
    start = "n/a" if before.get("val_acc") is None else f"{before['val_acc']:.3f}"
    return f"{start} -> {after['val_acc']:.3f}  (greedy, {after['val_acc_n']} prompts)"


def format_summary(s: dict) -> str:
    b, a = s["before"], s["after"]
    lines = ["", "lit_heads fit summary", f"  steps           {s['steps']}"]
    lines.append(f"  val loss        {b['val_loss']:.4f} -> {a['val_loss']:.4f}")
    if "val_acc" in a:
        lines.append(f"  val accuracy    {format_accuracy(b, a)}")
    for key, label in (("log_dir", "run folder"), ("wandb_run", "W&B run"), ("checkpoint", "checkpoint"),
                       ("export", "HF export")):
        lines.append(f"  {label:<15} {s.get(key) or '-'}")
    return "\n".join(lines)
