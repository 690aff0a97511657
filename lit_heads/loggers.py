"""Weights & Biases logging that never blocks or breaks a run.

- `offline=None` (the default) decides by itself: online only when an API key is configured and
  the W&B server answers; otherwise the run goes to `<save_dir>/wandb/offline-run-*`, which
  `wandb sync` uploads later. `WANDB_MODE` in the environment always wins.
- Every metric is also appended to `<save_dir>/metrics.jsonl`, so the numbers stay on disk even when
  W&B is disabled or fails in the middle of a run; a W&B error is reported once, then ignored.
- If W&B cannot even start the run (`WANDB_MODE=online` without a key, a rejected key, an
  unwritable folder...), the run falls back to offline W&B, or else to no W&B at all, says so once,
  and trains with `metrics.jsonl` as its record.
- A resumed fit continues the same W&B run: the run id is kept in every checkpoint (see
  `lit_heads.checkpoint_io`) and given back as `id` (with `resume="allow"`), and `metrics.jsonl` is
  cut back to where the checkpoint was taken, so steps replayed after a kill appear once.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_heads import _internals

_WANDB_HOST = "api.wandb.ai"


def wandb_should_be_offline() -> tuple[bool, str]:
    """(offline?, why) from WANDB_MODE, the API key and a 3-second reachability probe."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "dryrun", "disabled"}:
        return True, f"WANDB_MODE={mode}"
    if mode == "online":
        return False, "WANDB_MODE=online"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has_key():
        return True, "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    try:
        socket.create_connection((_WANDB_HOST, 443), timeout=3).close()
    except OSError:
        return True, f"{_WANDB_HOST} is not reachable"
    return False, "API key found and server reachable"


def _netrc_has_key() -> bool:
    try:
        return netrc.netrc().authenticators(_WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with automatic offline mode, a local metrics mirror and error tolerance."""

    def __init__(self, name: str | None = None, save_dir: str | None = None, project: str = "lit_heads",
                 offline: bool | None = None, group: str | None = None, **kwargs: Any):
        """
        Args:
            name: display name of the run.
            save_dir: folder for the W&B run, `metrics.jsonl` and `config.yaml`; `lit_heads fit` sets it to
                `trainer.default_root_dir` when the config leaves it unset (lit_heads/run_folder.py).
                Without either: the working directory, Lightning's default run folder.
            project: W&B project.
            offline: None decides automatically (see module docs); True/False force it.
            group: W&B group, e.g. to compare several arms.
            kwargs: passed on to `lightning.pytorch.loggers.WandbLogger` / `wandb.init`.
        """
        reason = "set in the config"
        if offline is None:
            offline, reason = wandb_should_be_offline()
        # Absolute: W&B's service process resolves a relative folder against its own working
        # directory, which is the one of the first run in this Python process.
        save_dir = os.path.abspath(save_dir if save_dir is not None else os.getcwd())
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        disabled = os.environ.get("WANDB_MODE", "").lower() == "disabled"
        if disabled:
            # Lightning turns offline=True into WANDB_MODE=dryrun, which would write an offline run.
            offline, kwargs = False, {**kwargs, "mode": "disabled"}
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, group=group, **kwargs)
        _internals.check_wandb_logger(self)
        self.metrics_file = Path(save_dir) / "metrics.jsonl"
        self._failed = False
        if offline:
            rank_zero_warn(f"W&B runs offline ({reason}); upload later with `wandb sync "
                           f"{Path(save_dir) / 'wandb'}/offline-run-*`.")

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # log_text/log_table/log_image arrive here too, as W&B objects: only numbers go to the mirror.
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1)}
        if numbers:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"step": step, **numbers}) + "\n")
        self._guard(super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        self._guard(super().log_hyperparams, params)

    def log_text(self, *args, **kwargs) -> None:
        self._guard(super().log_text, *args, **kwargs)

    def log_table(self, *args, **kwargs) -> None:
        self._guard(super().log_table, *args, **kwargs)

    def log_image(self, *args, **kwargs) -> None:
        self._guard(super().log_image, *args, **kwargs)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard(super().finalize, status)

    @rank_zero_only
    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run so its offline folder is complete (the CLI calls this after each
        command, with exit_code 1 when it failed)."""
        if self._experiment is not None:
            self._guard(self._experiment.finish, exit_code=exit_code)
            self._experiment = None

    @property
    @rank_zero_experiment
    def experiment(self):
        """The W&B run, created on first use. If W&B cannot create it, the run goes offline, or
        else W&B is switched off for this run (`metrics.jsonl` still gets every metric)."""
        if self._experiment is None:
            self._experiment = self._start_run()
        return self._experiment

    def _start_run(self):
        configured = self._wandb_init.get("mode") or ("offline" if self._offline else "online")
        fallbacks = {"offline": ["disabled"], "disabled": []}.get(configured, ["offline", "disabled"])
        errors = []
        for mode in [configured, *fallbacks]:
            # Always explicit: an init argument wins over WANDB_MODE, and over the mode that W&B's
            # process-wide settings kept from the first run of this process (a notebook or a test
            # session that ran with WANDB_MODE=disabled once would otherwise stay disabled).
            self._wandb_init["mode"] = mode
            try:
                run = _LightningWandbLogger.experiment.fget(self)
            except Exception as err:  # wandb raises UsageError, CommError, OSError... depending on the cause
                self._experiment = None
                text = str(err).strip()
                errors.append(f"{type(err).__name__}: {text.splitlines()[0] if text else ''}")
                continue
            if errors:
                what = (f"runs offline; upload later with `wandb sync {Path(self.save_dir) / 'wandb'}/offline-run-*`"
                        if mode == "offline" else "is off for this run")
                rank_zero_warn(f"W&B could not start the run ({errors[0]}); W&B {what}. Training continues and every "
                               f"metric goes to {self.metrics_file}.")
            return run
        self._failed = True
        rank_zero_warn(f"W&B could not start the run, not even switched off ({'; '.join(errors)}); training continues "
                       f"and every metric goes to {self.metrics_file}.")
        return DummyExperiment()

    @property
    def run_id(self) -> str | None:
        """Id of the W&B run (online or offline), or None when W&B is off or has not started; a
        resumed fit passes it back as `id` to continue the same run."""
        run = self._experiment
        if run is None or isinstance(run, DummyExperiment) or self._wandb_init.get("mode") == "disabled":
            return None
        return getattr(run, "id", None)

    # ---- metrics.jsonl across a resume ---------------------------------------------------------
    def mirror_mark(self) -> dict:
        """Where `metrics.jsonl` stands now: its size and a digest of its last line."""
        size = self.metrics_file.stat().st_size if self.metrics_file.is_file() else 0
        return {"file": str(self.metrics_file), "bytes": size, "last_line": _last_line_digest(self.metrics_file, size)}

    @rank_zero_only
    def rewind_mirror(self, mark: dict, keep_records: int = 0) -> None:
        """Cut `metrics.jsonl` back to `mark` (taken when a checkpoint was saved), keeping the next
        `keep_records` records, which belong to the checkpoint's step but were written after it was
        saved: the resumed run logs the records after them again. Nothing is cut when the file is not
        the one the mark was taken on (another folder, or changed since)."""
        if Path(mark.get("file", "")).resolve() != self.metrics_file.resolve() or not self.metrics_file.is_file():
            return
        end = int(mark["bytes"])
        with open(self.metrics_file, "rb") as f:
            data = f.read()
        if len(data) < end or _last_line_digest(self.metrics_file, end) != mark.get("last_line"):
            rank_zero_warn(f"{self.metrics_file} changed since the checkpoint was saved, so it is left as it is: "
                           "records of steps replayed after the resume point may appear twice.")
            return
        for _ in range(keep_records):
            newline = data.find(b"\n", end)
            end = len(data) if newline < 0 else newline + 1
        if end < len(data):
            with open(self.metrics_file, "r+b") as f:
                f.truncate(end)

    def _guard(self, fn, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # W&B trouble must not cost the user a training run
            self._failed = True
            rank_zero_warn(f"W&B logging failed ({type(err).__name__}: {err}); training continues and metrics go on to "
                           f"{self.metrics_file}.")

    @property
    def run_dir(self) -> str | None:
        """Local folder of the W&B run (offline-run-* or run-*), or None when W&B is disabled/failed."""
        try:
            run = self.experiment
        except Exception:
            return None
        return str(Path(run.dir).parent) if self.run_id and getattr(run, "dir", None) else None


def _last_line_digest(path: Path, end: int) -> str | None:
    """SHA-1 of the line that ends at byte `end` of `path` (None at 0)."""
    if end <= 0:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, end - 65536))
        chunk = f.read(end - max(0, end - 65536))
    line = chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return hashlib.sha1(line).hexdigest()
