"""Every private API of Lightning, torch and transformers that lit_heads uses, in one place.

A few things lit_heads does have no public API: resuming the data loader's exact position, re-running
a validation a kill interrupted, knowing whether Lightning will write a log record after this batch,
correcting a learning-rate scheduler's cached rate, hooking two LightningCLI steps, and dropping the
quantizer transformers attaches to a de-quantized GGUF model. Each is reached only through this
module. An accessor checks that the internal is there and raises `InternalsError` naming it and the
versions lit_heads is tested with; a rename in a new release then fails loudly at the first use
instead of silently turning exact resume (or anything else) off.

`check_all()` touches every internal the installed versions must have; `tests/test_internals.py`
runs it, so the version bounds in pyproject.toml are the ones this check passed on.

Nothing here imports Lightning at module level: `lit_heads.heads` (which must not depend on
Lightning) can use the torch accessors.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from lit_heads.errors import LitHeadsError

# The versions the test suite ran on; pyproject.toml's bounds allow these series only.
TESTED_WITH = "lightning 2.6, transformers 5.24, torch 2.13-2.14"

# LightningCLI steps lit_heads overrides (see lit_heads.cli): reading --ckpt_path's hyper-parameters
# (skipped for fit, whose resume check compares them instead) and running the subcommand (so that
# the W&B run is closed whatever happens).
CLI_HOOKS = ("_parse_ckpt_path", "_run_subcommand")

# Lightning's WandbLogger attributes that lit_heads.loggers.WandbLogger (a subclass) reads and sets:
# the created run, the keyword arguments for wandb.init, and the offline flag.
WANDB_LOGGER_ATTRIBUTES = ("_experiment", "_wandb_init", "_offline")


class InternalsError(LitHeadsError, RuntimeError):
    """An internal of Lightning, torch or transformers that lit_heads relies on is missing."""


def _missing(owner: str, name: str, why: str) -> InternalsError:
    import lightning
    import torch
    import transformers

    return InternalsError(
        f"lit_heads relies on {owner}.{name} ({why}), which the installed versions do not have "
        f"(lightning {lightning.__version__}, transformers {transformers.__version__}, torch {torch.__version__}). "
        f"lit_heads is tested with {TESTED_WITH}: install versions in the ranges pyproject.toml declares "
        "(`pip install -e .` does), or report this at the lit_heads issue tracker with the versions above."
    )


def _require(obj: Any, name: str, owner: str, why: str) -> Any:
    if not hasattr(obj, name):
        raise _missing(owner, name, why)
    return getattr(obj, name)


# ---- LightningCLI ------------------------------------------------------------------------------
def check_cli_hooks(cli_class: type) -> None:
    """The LightningCLI steps lit_heads overrides exist in the base class (otherwise the override
    would never be called, and a fit would silently skip what it does)."""
    for name in CLI_HOOKS:
        _require(cli_class, name, "lightning.pytorch.cli.LightningCLI", "lit_heads overrides it")


# ---- Lightning loggers -------------------------------------------------------------------------
def check_wandb_logger(logger: Any) -> None:
    """Lightning's WandbLogger keeps the attributes the lit_heads subclass uses."""
    for name in WANDB_LOGGER_ATTRIBUTES:
        _require(logger, name, "lightning.pytorch.loggers.WandbLogger", "the lit_heads W&B logger subclasses it")


# ---- Lightning's fit loop ----------------------------------------------------------------------
def logger_writes_after_this_batch(trainer: Any) -> bool:
    """Whether Lightning writes a log record after the current training batch (its logging cadence)."""
    connector = _require(trainer, "_logger_connector", "lightning.pytorch.Trainer", "the logging cadence")
    return bool(_require(connector, "should_update_logs", "Trainer._logger_connector", "the logging cadence"))


def restore_loader_states(trainer: Any) -> None:
    """Give the train loader the state (sampler position) stored in the checkpoint now. Lightning
    restores it only when it iterates the loader, after `on_train_start`, which is too late for
    callbacks that read the position first."""
    fit_loop = trainer.fit_loop
    why = "restoring the data loader's position on resume"
    pending = _require(fit_loop, "_combined_loader_states_to_load", "FitLoop", why)
    loader = _require(fit_loop, "_combined_loader", "FitLoop", why)
    if pending and loader is not None:
        _require(loader, "_load_state_dicts", "CombinedLoader", why)(pending)
        fit_loop._combined_loader_states_to_load = []


def validation_was_interrupted(trainer: Any) -> bool:
    """True when a fit resumed from a checkpoint taken at a training batch's end, before the
    validation that was due right after that batch (Lightning counts that validation as done)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    why = "re-running a validation interrupted by a kill"
    restarting = _require(epoch_loop, "restarting", "_TrainingEpochLoop", why)
    after_batch = _require(epoch_loop, "restarted_on_train_batch_end", "_TrainingEpochLoop", why)
    if not (restarting and after_batch):
        return False
    due = _require(epoch_loop, "_should_check_val_fx", "_TrainingEpochLoop", why)
    return bool(due(_require(trainer.fit_loop, "_data_fetcher", "FitLoop", why)))


def run_validation_now(trainer: Any) -> None:
    """A whole validation pass inside the training loop, as Lightning runs it after a batch."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    _require(val_loop, "restarting", "_EvaluationLoop", "re-running an interrupted validation")
    val_loop.restarting = False  # a whole pass, as in the uninterrupted run
    trainer.validating = True
    try:
        val_loop.run()
    finally:
        trainer.training = True


# ---- torch ---------------------------------------------------------------------------------------
def set_scheduler_lr(scheduler: Any, lrs: list[float]) -> None:
    """Correct an LR scheduler's cached last rates (what `get_last_lr()` and Lightning's
    LearningRateMonitor report) after its rates were re-derived in place."""
    _require(scheduler, "_last_lr", "torch.optim.lr_scheduler.LRScheduler", "re-deriving the schedule on resume")
    scheduler._last_lr = list(lrs)


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module inside a `torch.compile` wrapper, or None for any other module."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled; importing dynamo costs seconds
        return None
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(model, OptimizedModule):
        return None
    return _require(model, "_orig_mod", "torch._dynamo.OptimizedModule", "finding the heads of a compiled model")


# ---- transformers ------------------------------------------------------------------------------
def drop_quantizer(model: Any) -> None:
    """Forget any quantizer of a model whose weights were de-quantized to float32, so that
    `save_pretrained` and later loads do not treat the weights as quantized. transformers sets
    `hf_quantizer` only when it quantizes and reads it with a default of None, so setting None is
    safe whether or not the attribute is there."""
    model.hf_quantizer = None
    model.is_quantized = False


# ---- Lightning fabric ----------------------------------------------------------------------------
def is_local_path(path: str) -> bool:
    """Whether a checkpoint path is on the local file system (not s3://, gs://, ...)."""
    from lightning.fabric.utilities import cloud_io

    return bool(_require(cloud_io, "_is_local_file_protocol", "lightning.fabric.utilities.cloud_io",
                         "writing checkpoints atomically on local disks")(path))


def check_all() -> list[str]:
    """Check every internal above against the installed versions, on real objects where they are
    cheap to build; returns the names checked (raises InternalsError on the first missing one)."""
    import lightning as L
    import torch
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loops import _EvaluationLoop, _TrainingEpochLoop
    from lightning.pytorch.trainer.connectors.logger_connector import _LoggerConnector
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    checked = []

    def need(obj, name, owner):
        _require(obj, name, owner, "checked by lit_heads._internals.check_all")
        checked.append(f"{owner}.{name}")

    check_cli_hooks(LightningCLI)
    checked += [f"LightningCLI.{n}" for n in CLI_HOOKS]
    logger = WandbLogger(offline=True, save_dir="/nonexistent-never-created")  # creates nothing until used
    check_wandb_logger(logger)
    checked += [f"WandbLogger.{n}" for n in WANDB_LOGGER_ATTRIBUTES]
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    need(trainer, "_logger_connector", "Trainer")
    need(_LoggerConnector, "should_update_logs", "_LoggerConnector")
    need(trainer.fit_loop, "_combined_loader_states_to_load", "FitLoop")
    need(trainer.fit_loop, "_combined_loader", "FitLoop")
    need(trainer.fit_loop, "_data_fetcher", "FitLoop")
    need(CombinedLoader, "_load_state_dicts", "CombinedLoader")
    need(_TrainingEpochLoop, "restarted_on_train_batch_end", "_TrainingEpochLoop")
    need(_TrainingEpochLoop, "_should_check_val_fx", "_TrainingEpochLoop")
    need(trainer.fit_loop.epoch_loop, "restarting", "_TrainingEpochLoop")
    need(_EvaluationLoop, "run", "_EvaluationLoop")
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                  lambda step: 1.0)
    need(scheduler, "_last_lr", "LRScheduler")
    compiled = torch.compile(nn.Linear(1, 1))
    need(compiled, "_orig_mod", "OptimizedModule")
    from lightning.fabric.utilities import cloud_io

    need(cloud_io, "_is_local_file_protocol", "cloud_io")
    return checked
