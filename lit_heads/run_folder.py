"""One run folder: `trainer.default_root_dir` (Lightning's own knob) holds every output of a run.

    <root>/metrics.jsonl, wandb/, config.yaml   the logger (lit_heads.loggers.WandbLogger save_dir)
    <root>/checkpoints/                         ModelCheckpoint
    <root>/heads/                               HeadActivationMonitor, HeadRestrictedFinetuning
    <root>/export/                              ExportHF
    <root>/fit_summary.json                     FitSummary

The callbacks fall back to these sub-folders when their `dirpath` is not set. The logger and
`ModelCheckpoint` are built before the Trainer exists, so `lit_heads fit` fills their folders from
`trainer.default_root_dir` in the config (`fill_run_folder`) when the config leaves them unset:
`--trainer.default_root_dir runs/ddp` moves the whole run. No Lightning import at module level, so the
report code can read the names without it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
HEADS = "heads"
EXPORT = "export"
FIT_SUMMARY = "fit_summary.json"
# How reports show an accuracy of None (fit_summary.json: val_acc null, val_acc_n 0): nothing was graded.
NO_ACCURACY = "n/a (no gradable answers)"


def run_root(trainer) -> Path:
    return Path(trainer.default_root_dir)


def output_dir(trainer, dirpath: str | os.PathLike | None, sub: str) -> Path:
    """`dirpath` when given, else `<trainer.default_root_dir>/<sub>`."""
    return Path(dirpath) if dirpath else run_root(trainer) / sub


def fill_run_folder(trainer_config: Any) -> None:
    """Point the logger's `save_dir` and every ModelCheckpoint's `dirpath` that the parsed `trainer`
    config section (a jsonargparse Namespace) leaves unset at `trainer.default_root_dir` (default: the
    working directory, as in Lightning). Without a ModelCheckpoint in the config while checkpointing
    is on, one is added for `<root>/checkpoints`: Lightning's default would put it under the W&B
    run's project and id, where `--ckpt_path last` never finds it."""
    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = trainer_config.get("default_root_dir") or os.getcwd()
    logger = trainer_config.get("logger")
    for spec in logger if isinstance(logger, list) else [logger]:
        if _is_subclass(spec, "lit_heads.loggers.WandbLogger") and spec.init_args.get("save_dir") is None:
            spec.init_args.save_dir = str(root)

    callbacks = trainer_config.get("callbacks") or []
    checkpoints = [spec for spec in callbacks if _is_subclass(spec, ModelCheckpoint)]
    for spec in checkpoints:
        if spec.init_args.get("dirpath") is None:
            spec.init_args.dirpath = str(Path(root) / CHECKPOINTS)
    if not checkpoints and trainer_config.get("enable_checkpointing") is not False:
        default = Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                            init_args=Namespace(dirpath=str(Path(root) / CHECKPOINTS)))
        trainer_config.callbacks = [*callbacks, default]


def _is_subclass(spec: Any, base) -> bool:
    """Whether a class_path/init_args spec names `base` (a class or its import path) or a subclass."""
    class_path = getattr(spec, "class_path", None) if spec is not None else None
    if not isinstance(class_path, str):
        return False
    if isinstance(base, str):
        module, _, name = base.rpartition(".")
        base = getattr(importlib.import_module(module), name)
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # the parser reports an unknown class itself
    return isinstance(cls, type) and issubclass(cls, base)
