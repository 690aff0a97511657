"""Crash-safe checkpoints: atomic writes, clear load errors, exact mid-epoch resume.

Why not Lightning's default `TorchCheckpointIO`: it writes through an fsspec transaction whose
temporary file lies in the system temp folder, then `shutil.move`s it over the target. When the
temp folder and the checkpoint folder are on different filesystems (tmpfs /tmp, a network or
scratch disk for runs: the usual cluster layout) that move is a plain copy onto `last.ckpt`, and a
kill during the copy leaves a truncated `last.ckpt` where a good one was; nothing is fsync'ed
either. `AtomicCheckpointIO` writes through `lit_heads.atomic.atomic_write`: a temp file *in the
checkpoint's own folder*, fsynced and `os.replace`d over the target (atomic on POSIX and Windows), so a reader, a resume or a crash
sees the old file or the new one, never a mix. This covers `last.ckpt` too: with
`ModelCheckpoint(save_last=True)` it is written through the same `save_checkpoint` call. (With
`save_last="link"` Lightning replaces the link itself, by remove + symlink: a kill in between
leaves no `last.ckpt`, but the file it pointed at stays whole.) The temp name
(`.<name>.<random>.tmp`) never matches Lightning's `last*.ckpt` pattern, so `--ckpt_path last`
cannot pick a leftover one.

`CheckpointSafety` is the callback `lit_heads fit` always adds (see `cli.run_lightning`). It
1. installs `AtomicCheckpointIO` when the strategy would use the plain `TorchCheckpointIO`
   (a CheckpointIO the user configured, e.g. in `trainer.plugins`, is left alone);
2. turns an unreadable or missing `--ckpt_path` and a checkpoint of another model into a
   `ModelError` that names the file and the mismatch, instead of a torch traceback;
3. restores the train loader's position when Lightning skipped it: Lightning loads stateful
   loaders' state only if the loader was not built before the loop state was restored, but
   `trainer.estimated_stepping_batches` (used by our warmup-cosine schedule in
   `configure_optimizers`) builds it early (Lightning issue #20550), so the state is applied here,
   at train start, before the first batch is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_heads.atomic import atomic_write
from lit_heads.errors import ModelError
from lit_heads.models import checkpoint_is_a_directory, unreadable_checkpoint

__all__ = ["AtomicCheckpointIO", "CheckpointSafety", "unreadable_checkpoint"]


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
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: self._write(checkpoint, f))

    def _write(self, checkpoint: dict[str, Any], f) -> None:
        """Serialise into the open temp file (a seam for tests that kill the process mid-write)."""
        torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        local = _is_local_file_protocol(str(path))
        if local and Path(path).is_dir():
            raise ModelError(checkpoint_is_a_directory(path))
        if local and not Path(path).is_file():
            folder = Path(path).parent
            found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            hint = f" Checkpoints in {folder}: {', '.join(found[:8])}." if found else ""
            raise ModelError(
                f"Checkpoint {path} does not exist, so there is nothing to resume from.{hint} Give an existing "
                f".ckpt written by `lit_heads fit` (or `--ckpt_path last` for the newest last*.ckpt of the "
                f"ModelCheckpoint folder), or drop --ckpt_path to start a new run."
            )
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError... for a bad file
            raise unreadable_checkpoint(path, err) from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ModelError(f"{path} is not a Lightning checkpoint (it has no 'state_dict'). Give a .ckpt written by `lit_heads fit`.")
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
        details.append(f"{len(wrong)} tensors have another shape (e.g. {k}: {list(saved[k])} in the checkpoint, {list(expected[k])} in this model)")
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
    """Atomic checkpoint files, clear errors for a checkpoint that cannot be resumed, and the train
    loader's mid-epoch position restored (see the module docstring). `lit_heads fit` adds it."""

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

    def on_train_start(self, trainer, pl_module):
        fit_loop = trainer.fit_loop
        pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
        loader = getattr(fit_loop, "_combined_loader", None)
        if pending and loader is not None:
            loader._load_state_dicts(pending)
            fit_loop._combined_loader_states_to_load = []


def _plain_state_dict(strategy) -> bool:
    # Sharded strategies (FSDP, DeepSpeed) gather state dicts collectively: never call
    # module.state_dict() from a load hook there.
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
