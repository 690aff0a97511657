"""Crash-safe checkpoints: atomic writes, clear load errors, exact mid-epoch resume.

Why not Lightning's default `TorchCheckpointIO`: it writes through an fsspec transaction whose
temporary file lies in the system temp folder, then `shutil.move`s it over the target. When the
temp folder and the checkpoint folder are on different filesystems (tmpfs /tmp, a network or
scratch disk for runs: the usual cluster layout) that move is a plain copy onto `last.ckpt`, and a
kill during the copy leaves a truncated `last.ckpt` where a good one was; nothing is fsync'ed
either. `AtomicCheckpointIO` writes through `lit_heads.atomic.atomic_write`: a temp file *in the
checkpoint's own folder*, fsynced and `os.replace`d over the target (atomic on POSIX and Windows),
so a reader, a resume or a crash
sees the old file or the new one, never a mix. This covers `last.ckpt` too: with
`ModelCheckpoint(save_last=True)` it is written through the same `save_checkpoint` call. (With
`save_last="link"` Lightning replaces the link itself, by remove + symlink: a kill in between
leaves no `last.ckpt`, but the file it pointed at stays whole.) The temp name
(`.<name>.<pid>-<random>.tmp`) never matches Lightning's `last*.ckpt` pattern, so `--ckpt_path last`
cannot pick a leftover one, and the next `lit_heads fit` into the run folder removes it.

`CheckpointSafety` is the callback `lit_heads fit` always adds (see `cli.run_lightning`). It
1. installs `AtomicCheckpointIO` when the strategy would use the plain `TorchCheckpointIO`
   (a CheckpointIO the user configured, e.g. in `trainer.plugins`, is left alone);
2. turns an unreadable or missing `--ckpt_path` and a checkpoint of another model into a
   `ModelError` that names the file and the mismatch, instead of a torch traceback;
3. restores the train loader's position when Lightning skipped it: Lightning loads stateful
   loaders' state only if the loader was not built before the loop state was restored, but
   `trainer.estimated_stepping_batches` (used by our warmup-cosine schedule in
   `configure_optimizers`) builds it early (Lightning issue #20550), so the state is applied here,
   at train start, before the first batch is drawn;
4. makes a resumed fit one logical run with the run it resumes (`RUN_RECORD` in every checkpoint):
   - it refuses a resume with another world size or gradient accumulation (the loader position is
     counted in batches; the CLI refuses the other differences before the model loads, see
     `lit_heads.resume`);
   - `metrics.jsonl` is cut back to where the checkpoint was taken, so that steps replayed after a
     kill are recorded once;
   - the W&B run id is kept so the resumed fit continues the same W&B run;
   - the warmup-cosine schedule is re-derived for a changed number of steps (`max_steps`): from the
     resume step on, the learning rate follows the schedule of the new total;
   - a validation that was due right after the checkpoint's step, and that a kill interrupted, is
     run before training continues (Lightning skips it: it counts it as done).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lit_heads import _internals
from lit_heads.atomic import atomic_write
from lit_heads.errors import ConfigError, ModelError
from lit_heads.models import checkpoint_is_a_directory, checkpoint_missing, unreadable_checkpoint

__all__ = ["AtomicCheckpointIO", "CheckpointSafety", "RUN_RECORD", "unreadable_checkpoint"]

# Top-level checkpoint key of what makes a resumed fit the same run (see CheckpointSafety).
RUN_RECORD = "lit_heads_run"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes are atomic (temp file in the same folder, fsync,
    `os.replace`) and whose load errors are `ModelError`s naming the file. Remote paths
    (s3://, gs://...) keep Lightning's fsspec path. Usable directly as a Trainer plugin:
    `trainer.plugins: [{class_path: lit_heads.checkpoint_io.AtomicCheckpointIO}]`."""

    def __init__(self) -> None:
        super().__init__()
        # Set by CheckpointSafety: parameter shapes of the module a checkpoint is loaded into.
        self.expected_shapes: Optional[Callable[[], dict[str, tuple]]] = None
        self.strict = True

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _internals.is_local_path(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: self._write(checkpoint, f))

    def _write(self, checkpoint: dict[str, Any], f) -> None:
        """Serialise into the open temp file (a seam for tests that kill the process mid-write)."""
        torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        local = _internals.is_local_path(str(path))
        if local and Path(path).is_dir():
            raise ModelError(checkpoint_is_a_directory(path))
        if local and not Path(path).is_file():
            raise ModelError(checkpoint_missing(path))
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError... for a bad file
            raise unreadable_checkpoint(path, err) from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ModelError(f"{path} is not a Lightning checkpoint (it has no 'state_dict'). Give a .ckpt written by "
                             "`lit_heads fit`.")
        if self.expected_shapes is not None:
            _check_fits(path, checkpoint, self.expected_shapes(), self.strict)
        return checkpoint


def _check_fits(path, checkpoint: dict, expected: dict[str, tuple], strict: bool) -> None:
    """ModelError when the checkpoint's tensors do not fit the module (names and shapes)."""
    saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    wrong = [k for k in saved.keys() & expected.keys() if saved[k] != expected[k]]
    missing = sorted(expected.keys() - saved.keys()) if strict else []
    unexpected = sorted(saved.keys() - expected.keys()) if strict else []
    if not (wrong or missing or unexpected):
        return
    trained_from = (checkpoint.get("hyper_parameters") or {}).get("model")
    details = []
    if wrong:
        k = sorted(wrong)[0]
        details.append(f"{len(wrong)} tensors have another shape (e.g. {k}: {list(saved[k])} in the checkpoint, "
                       f"{list(expected[k])} in this model)")
    if missing:
        details.append(f"{len(missing)} tensors of this model are missing (e.g. {missing[:2]})")
    if unexpected:
        details.append(f"{len(unexpected)} tensors are not in this model (e.g. {unexpected[:2]})")
    raise ModelError(
        f"Checkpoint {path} does not fit this model: {'; '.join(details)}. It was trained from model "
        f"{trained_from!r}. Resume with the model (and head-restriction options) it was trained with, "
        f"or drop --ckpt_path to start a new run."
    )


class CheckpointSafety(L.Callback):
    """Atomic checkpoint files, clear errors for a checkpoint that cannot be resumed, the train
    loader's mid-epoch position restored, and a resumed fit kept one run with the one it resumes
    (see the module docstring). `lit_heads fit` adds it."""

    def __init__(self) -> None:
        self._after_train_batch = False  # between a training batch's end and the next batch/validation
        self._resumed: dict | None = None  # RUN_RECORD of the checkpoint this fit resumed from
        self._stepping_batches: int | None = None

    def setup(self, trainer, pl_module, stage):
        strategy = trainer.strategy
        io = strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:  # exactly Lightning's default; never replace a user's choice
            io = AtomicCheckpointIO()
            strategy.checkpoint_io = io
        if isinstance(io, AtomicCheckpointIO) and _plain_state_dict(strategy):
            # Read when the checkpoint is loaded: after setup, so head-restriction parametrizations
            # applied in other callbacks' setup are part of the expected names.
            io.expected_shapes = lambda: {k: tuple(v.shape) for k, v in pl_module.state_dict().items()}
            io.strict = bool(getattr(pl_module, "strict_loading", True))

    # ---- what a checkpoint records, and where in the step it was taken -----------------------
    # Lightning runs checkpoint callbacks after all others, so these flags are set before a
    # ModelCheckpoint of the same hook saves.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._after_train_batch = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._after_train_batch = True

    def on_validation_start(self, trainer, pl_module):
        self._after_train_batch = False

    def on_train_epoch_end(self, trainer, pl_module):
        self._after_train_batch = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # A checkpoint taken at a training batch's end precedes that step's logged record (Lightning
        # writes it right after the batch-end hooks), which a resume does not log again.
        keep = int(self._after_train_batch and _internals.logger_writes_after_this_batch(trainer))
        checkpoint[RUN_RECORD] = {
            "seed": _int_or_none(os.environ.get("PL_GLOBAL_SEED")),
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "max_steps": trainer.max_steps,
            "stepping_batches": self._stepping_batches,
            "wandb_run_id": next((lg.run_id for lg in trainer.loggers if getattr(lg, "run_id", None)), None),
            "metrics": [{**lg.mirror_mark(), "keep_records": keep}
                        for lg in trainer.loggers if hasattr(lg, "mirror_mark")],
        }

    # ---- resume -----------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        record = checkpoint.get(RUN_RECORD)
        if trainer.state.fn != "fit" or not record:
            return
        changed = [f"{name} {record[name]} in the checkpoint, {now} now" for name, now in (
            ("world_size", trainer.world_size), ("accumulate_grad_batches", trainer.accumulate_grad_batches),
        ) if record.get(name) is not None and record[name] != now]
        if changed:
            raise ConfigError(
                f"This fit cannot resume the checkpoint: {'; '.join(changed)}. The data loader's position "
                "is kept in batches per process and the optimizer step in accumulated batches, so other "
                "processes or accumulation would skip or repeat samples. Resume with the devices, nodes and "
                "accumulate_grad_batches it was trained with, or start a new run."
            )
        self._resumed = record
        for logger in trainer.loggers:
            marks = [m for m in record.get("metrics", []) if hasattr(logger, "rewind_mirror")]
            for mark in marks:
                logger.rewind_mirror(mark, mark.get("keep_records", 0))

    def on_train_start(self, trainer, pl_module):
        _internals.restore_loader_states(trainer)
        self._stepping_batches = int(trainer.estimated_stepping_batches)
        if self._resumed is not None:
            self._retarget_schedules(trainer)
            _redo_interrupted_validation(trainer)

    def _retarget_schedules(self, trainer) -> None:
        from lit_heads.optim import WarmupCosine

        before, now = self._resumed.get("stepping_batches"), self._stepping_batches
        if before is None or before == now:
            return
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            # Only a total the module derived from the trainer (total_steps=None in the config): an
            # explicit total_steps is the user's choice and stays.
            if isinstance(scheduler, WarmupCosine) and scheduler.total_steps == before:
                scheduler.total_steps = now
                step = scheduler.last_epoch
                for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] = base * scheduler._factor(step)
                _internals.set_scheduler_lr(scheduler, [group["lr"] for group in scheduler.optimizer.param_groups])
                rank_zero_info(
                    f"lit_heads: resuming at step {trainer.global_step} with {now} training steps instead of "
                    f"{before}: the warmup-cosine schedule is re-derived for {now} steps, so from step "
                    f"{trainer.global_step} on the learning rate follows it (now {scheduler.get_last_lr()[0]:.3g})."
                )


def _redo_interrupted_validation(trainer) -> None:
    """Run the validation that was due right after the checkpoint's step. A checkpoint taken at a
    training batch's end precedes that step's validation; Lightning, resuming from it, marks that
    validation as done and goes on training, so a kill during it would lose it."""
    if not _internals.validation_was_interrupted(trainer):
        return
    rank_zero_info(f"lit_heads: the checkpoint was taken before step {trainer.global_step}'s validation; "
                   "validating now.")
    _internals.run_validation_now(trainer)


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _plain_state_dict(strategy) -> bool:
    # Sharded strategies (FSDP, DeepSpeed) gather state dicts collectively: never call
    # module.state_dict() from a load hook there.
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
