"""Weights & Biases logging that never blocks or breaks a run.

- `offline=None` (the default) decides by itself: online only when an API key is configured and
  the W&B server answers; otherwise the run goes to `<save_dir>/wandb/offline-run-*`, which
  `wandb sync` uploads later. `WANDB_MODE` in the environment always wins.
- Every metric is also appended to `<save_dir>/metrics.jsonl`, so the numbers stay on disk even when
  W&B is disabled or fails in the middle of a run; a W&B error is reported once, then ignored.
"""

from __future__ import annotations

import json
import netrc
import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

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

    def __init__(self, name: str | None = None, save_dir: str | None = None, project: str = "lit_heads", offline: bool | None = None, group: str | None = None, **kwargs: Any):
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
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, group=group, **kwargs)
        self.metrics_file = Path(save_dir) / "metrics.jsonl"
        self._failed = False
        if offline and os.environ.get("WANDB_MODE", "").lower() != "disabled":
            rank_zero_warn(f"W&B runs offline ({reason}); upload later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`.")

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # log_text/log_table/log_image arrive here too, as W&B objects: only numbers go to the mirror.
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1)}
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

    def _guard(self, fn, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # W&B trouble must not cost the user a training run
            self._failed = True
            rank_zero_warn(f"W&B logging failed ({type(err).__name__}: {err}); training continues and metrics go on to {self.metrics_file}.")

    @property
    def run_dir(self) -> str | None:
        """Local folder of the W&B run (offline-run-* or run-*), or None when W&B is disabled/failed."""
        try:
            return getattr(self.experiment, "dir", None) and str(Path(self.experiment.dir).parent)
        except Exception:
            return None
