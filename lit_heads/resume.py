"""What `lit_heads fit --ckpt_path ...` resumes, checked before the model loads.

`--ckpt_path` takes a checkpoint file, `last` (the newest `last*.ckpt` in the config's
ModelCheckpoint folder: an error when there is none) or `last_or_new` (the same, but a new run when
there is none, which it says). Both a named file and `last` go through the same check: the config of
this fit is compared with the one saved in the checkpoint, and a resume that changes what cannot
change is refused, naming each difference:

- the model and how it trains: `model.model`, the optimizer and the LR schedule (their state comes
  back from the checkpoint, so a changed value would be silently ignored);
- the data: files, generated tasks, sizes, splits, `batch_size`, `max_length`, seed (the loader's
  position is kept in batches of the saved order);
- `seed_everything`, `trainer.accumulate_grad_batches`, and the options of head-restricted SFT (and
  of any callback with a `resume_differences` method).

What may change: validation and generation settings (`num_generate`, `max_new_tokens`),
`attn_implementation`, `gradient_checkpointing` (and its `_reentrant` choice), `data.num_workers`,
and the trainer's length
(`max_steps`): with more steps the learning-rate schedule is re-derived for the new total from the
resume step on (see `lit_heads.checkpoint_io.CheckpointSafety`), which this module announces.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from lit_heads.errors import ConfigError

LAST, LAST_OR_NEW = "last", "last_or_new"
# Lightning's other special values, passed on as they are.
_LIGHTNING_SPECIAL = {"best", "hpc"}

MODEL_MAY_CHANGE = {"num_generate", "max_new_tokens", "attn_implementation", "gradient_checkpointing",
                    "gradient_checkpointing_reentrant"}
DATA_MAY_CHANGE = {"num_workers", "test"}


def checkpoint_dirs(trainer_config) -> list[Path]:
    """The folders of the config's ModelCheckpoint callbacks (those that name a dirpath)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs = []
    for entry in trainer_config.get("callbacks") or []:
        cls = _class_of(entry)
        dirpath = _init_args(entry).get("dirpath")
        if cls is not None and issubclass(cls, ModelCheckpoint) and dirpath:
            dirs.append(Path(dirpath))
    return dirs


def resolve_ckpt_path(value: str | None, dirs: list[Path]) -> tuple[Path | None, str | None]:
    """(checkpoint file or None, a note to print). `last` without a checkpoint is an error;
    `last_or_new` starts a new run. Lightning's own special values (best, hpc, registry) are not
    handled here (None, None)."""
    from lit_heads.models import checkpoint_is_a_directory, checkpoint_missing

    if value is None or value in _LIGHTNING_SPECIAL or str(value).startswith("registry"):
        return None, None
    if value not in (LAST, LAST_OR_NEW):
        path = Path(value)
        if "://" in str(value):
            return path, None  # a remote checkpoint: Lightning's fsspec IO reads it
        if path.is_dir():
            raise ConfigError(checkpoint_is_a_directory(path))
        if not path.is_file():
            raise ConfigError(checkpoint_missing(path))
        return path, None
    if not dirs:
        raise ConfigError(
            f"--ckpt_path {value} resumes from the newest last*.ckpt of the run's ModelCheckpoint folder, but "
            "the config has no ModelCheckpoint with a dirpath, so there is no folder to look in. Add one "
            "(trainer.callbacks: ModelCheckpoint with dirpath and save_last: true) or give a checkpoint file."
        )
    found = [p for d in dirs if d.is_dir() for p in d.iterdir() if _is_last(p)]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime), None
    where = ", ".join(str(d) for d in dirs)
    if value == LAST_OR_NEW:
        return None, f"lit_heads: --ckpt_path last_or_new: no last*.ckpt in {where}; starting a new run."
    raise ConfigError(
        f"--ckpt_path last: there is no last*.ckpt in {where}, so there is nothing to resume. Drop --ckpt_path "
        "to start a new run, use --ckpt_path last_or_new to resume when a checkpoint exists and start a new "
        "run otherwise, or give a checkpoint file."
    )


def _is_last(path: Path) -> bool:
    # Lightning's own rule for `last` (ModelCheckpoint._find_last_checkpoints).
    from lightning.pytorch.callbacks import ModelCheckpoint

    return (path.suffix == ModelCheckpoint.FILE_EXTENSION
            and re.match(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-(\d+))?", path.stem) is not None)


class Resume:
    """The comparison of a fit's config with a checkpoint it is asked to resume."""

    def __init__(self, path: Path, checkpoint: dict):
        from lit_heads.checkpoint_io import RUN_RECORD

        self.path, self.checkpoint = path, checkpoint
        self.record: dict = checkpoint.get(RUN_RECORD) or {}
        self.refused: list[str] = []
        self.notes: list[str] = []

    def compare(self, fit_config) -> "Resume":
        saved_model = _plain(self.checkpoint.get("hyper_parameters") or {})
        self._section("model", saved_model, _plain(fit_config.model), MODEL_MAY_CHANGE)
        saved_data = _plain(self.checkpoint.get("datamodule_hyper_parameters") or {})
        self._section("data", saved_data, _plain(fit_config.data), DATA_MAY_CHANGE)
        trainer = fit_config.trainer
        for name, saved, now in (
            ("seed_everything", self.record.get("seed"), _seed(fit_config.get("seed_everything"))),
            ("trainer.accumulate_grad_batches", self.record.get("accumulate_grad_batches"),
             trainer.get("accumulate_grad_batches")),
        ):
            if saved is not None and saved != now:
                self.refused.append(f"{name}: {saved!r} in the checkpoint, {now!r} now")
        self._callbacks(trainer.get("callbacks") or [])
        step = self.checkpoint.get("global_step")
        before = self.record.get("max_steps")
        if before is not None and before != trainer.get("max_steps"):
            self.notes.append(
                f"trainer.max_steps {before} -> {trainer.get('max_steps')}: the run continues from step {step}, and "
                "a warmup-cosine schedule derived from the trainer is re-derived for the new total from there on"
            )
        return self

    def _section(self, section: str, saved: dict, now: dict, may_change: set[str]) -> None:
        # Keys of one side only are options of another lit_heads (or torch) version: not compared.
        for key in sorted(saved.keys() & now.keys()):
            if key.startswith("_") or key in may_change or _same(key, saved[key], now[key]):
                continue
            self.refused.append(f"{section}.{key}: {_show(saved[key])} in the checkpoint, {_show(now[key])} now")

    def _callbacks(self, entries) -> None:
        states = self.checkpoint.get("callbacks") or {}
        from lit_heads.heads.restrict import CHECKPOINT_STATE_KEY

        restricted_before = any(str(k).startswith(CHECKPOINT_STATE_KEY) for k in states)
        restricted_now = False
        for entry in entries:
            cls = _class_of(entry)
            if cls is None or not hasattr(cls, "resume_differences"):
                continue
            callback = cls(**_init_args(entry))
            saved = states.get(callback.state_key)
            restricted_now |= callback.state_key == CHECKPOINT_STATE_KEY
            if saved is not None:
                self.refused += callback.resume_differences(saved)
        if restricted_before != restricted_now:
            was, now = ("head-restricted", "full SFT") if restricted_before else ("full SFT", "head-restricted")
            self.refused.append(f"the checkpoint is from a {was} fit, this config is {now}")

    def raise_if_refused(self) -> None:
        if self.refused:
            raise ConfigError(
                f"Cannot resume {self.path}: this fit differs from the one that wrote it in what a resume cannot "
                f"change: {'; '.join(self.refused)}. Resume with the options the checkpoint was trained with "
                "(e.g. the config.yaml saved in its run folder), or drop --ckpt_path to start a new run."
            )


def _plain(value) -> Any:
    """Namespaces, tuples and paths as plain JSON values, so a config and a checkpoint compare."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def _same(key: str, saved, now) -> bool:
    if saved == now:
        return True
    if isinstance(saved, dict) and isinstance(now, dict) and "class_path" in saved and "class_path" in now:
        # An optimizer or schedule: the same class with the same values of the arguments both know.
        a, b = saved.get("init_args") or {}, now.get("init_args") or {}
        return saved["class_path"] == now["class_path"] and all(_same(k, a[k], b[k]) for k in a.keys() & b.keys())
    if isinstance(saved, str) and isinstance(now, str):
        if key in ("model", "tokenizer"):
            from lit_heads.models import same_model

            return same_model(saved, now)
        return _same_file(saved, now)
    return False


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _seed(value):
    return None if value is None or isinstance(value, bool) else int(value)


def _show(value) -> str:
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v!r}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path']}({args})"
    return repr(value)


def _class_of(entry):
    class_path = entry.get("class_path") if hasattr(entry, "get") else None
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _init_args(entry) -> dict:
    args = entry.get("init_args") if hasattr(entry, "get") else None
    return dict(args.as_dict() if hasattr(args, "as_dict") else (args or {}))
