"""Export the trained model in Hugging Face format when fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_heads.run_folder import EXPORT, output_dir


class ExportHF(L.Callback):
    """Write `save_pretrained` output (model + tokenizer) to `dirpath` at the end of fit.

    The export is plain Hugging Face format: `AutoModelForCausalLM.from_pretrained(dirpath)` reloads
    it with no lit_heads code. Callbacks that keep trained weights apart from the base model (head
    deltas) implement `merge_for_export(pl_module)` and are merged first.
    """

    def __init__(self, dirpath: str | None = None):
        """
        Args:
            dirpath: export folder; default `<trainer.default_root_dir>/export`.
        """
        self.dirpath = dirpath
        self.target: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.target = output_dir(trainer, self.dirpath, EXPORT)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.callbacks:
            if hasattr(callback, "merge_for_export"):
                callback.merge_for_export(pl_module)
        if trainer.is_global_zero:
            pl_module.export_hf(self.target)
            rank_zero_info(f"lit_heads: exported Hugging Face model to {self.target}")
        trainer.strategy.barrier("lit_heads_export")
