"""`lit_heads`: the command-line entry point.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands: YAML configs, stacked
`--config` files, `--print_config`, dotted overrides and the Trainer's own flags for devices,
strategy and precision. The analysis commands (`ap`, ...) are plain jsonargparse commands that read
the same config style; they are listed in `EXTRA_COMMANDS`.
"""

from __future__ import annotations

import pickle
import sys

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_heads import _internals
from lit_heads.data import SFTDataModule
from lit_heads.errors import LitHeadsError
from lit_heads.module import SFTModule


class SaveConfigToLoggers(SaveConfigCallback):
    """Save the resolved config next to the run (overwriting the previous run's copy) and send it to
    the loggers, so the W&B run holds the exact config that produced it."""

    def setup(self, trainer, pl_module, stage) -> None:
        # Deferred to the start of the run: a run that fails while its callbacks set up or its
        # checkpoint loads must not replace the previous good run's config.yaml.
        pass

    def _save_once(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # a no-op once saved; collective, so every rank calls it

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._save_once(trainer, pl_module, "predict")

    def save_config(self, trainer, pl_module, stage) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config_yaml": config})
            run_dir = getattr(logger, "run_dir", None)
            if run_dir:
                from pathlib import Path

                Path(run_dir, "files").mkdir(parents=True, exist_ok=True)
                Path(run_dir, "files", "lit_heads_config.yaml").write_text(config)


class LitHeadsCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        _internals.check_cli_hooks(LightningCLI)  # the overrides below must replace real steps
        self._run_locks: list = []
        try:
            super().__init__(*args, **kwargs)  # parses, instantiates and runs the subcommand
        finally:
            for lock in self._run_locks:
                lock.release()

    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the model's own tokenizer; one name configures both.
        parser.link_arguments("model.model", "data.tokenizer")

    def before_instantiate_classes(self) -> None:
        # Before the logger (first) and the model are built: bad data or a model that cannot work
        # fails in seconds, before a model loads or a W&B run folder appears; the run folder's
        # defaults are filled in.
        from lit_heads.data.datamodule import check_data_sources
        from lit_heads.launch import check_launch_environment
        from lit_heads.models import check_model
        from lit_heads.run_folder import fill_run_folder

        config = self.config[self.config.subcommand]
        check_launch_environment(config.trainer)
        check_data_sources(config.data)
        check_model(config.model.model, heads=_uses_heads(config.trainer))
        fill_run_folder(config.trainer)
        if self.subcommand == "fit":
            self._prepare_fit()  # after fill_run_folder: it resolves `last` in the filled checkpoint folder

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") == "fit":
            # LightningCLI would replace the model config with the checkpoint's hyper-parameters, for
            # a checkpoint file but not for `last`; a fit compares them instead (before_instantiate_classes).
            return
        # LightningCLI reads --ckpt_path's hyper-parameters with torch.load before the Trainer (and
        # its CheckpointIO with clear errors) sees the file.
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            from lit_heads.checkpoint_io import unreadable_checkpoint

            raise unreadable_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), err) from err

    def _prepare_fit(self) -> None:
        """Before the model loads: check the checkpoint to resume, then lock the run folders and
        remove temps that killed runs left there (see lit_heads.resume and lit_heads.run_lock)."""
        from lit_heads.models import read_checkpoint
        from lit_heads.resume import Resume, checkpoint_dirs, resolve_ckpt_path
        from lit_heads.run_lock import launching_process

        config = self.config.fit
        dirs = checkpoint_dirs(config.trainer)
        requested = config.get("ckpt_path")
        path, note = resolve_ckpt_path(requested, dirs)
        resume = None
        if path is not None and path.is_file():
            resume = Resume(path, read_checkpoint(path)).compare(config)
            resume.raise_if_refused()
        if launching_process():
            self._lock_run_folders([config.trainer.get("default_root_dir"), _logger_save_dir(config.trainer), *dirs])
            if note:
                print(note, file=sys.stderr)
            if resume is not None:
                print(f"lit_heads: resuming {path} at step {resume.checkpoint.get('global_step')}"
                      + "".join(f"; {n}" for n in resume.notes) + ".", file=sys.stderr)
        if requested in ("last", "last_or_new") or path is not None:
            config.ckpt_path = str(path) if path is not None else None
        if resume is not None:
            _continue_wandb_run(config.trainer, resume.record.get("wandb_run_id"))

    def _lock_run_folders(self, folders) -> None:
        from lit_heads.atomic import remove_stale_temps
        from lit_heads.run_lock import RunLock, root_folders

        for folder in root_folders(folders):
            self._run_locks.append(RunLock(folder).acquire())
            removed = remove_stale_temps(folder)
            if removed:
                print(f"lit_heads: removed {len(removed)} temporary file(s) of killed runs from {folder} "
                      f"({sum(removed.values()) / 2**20:.1f} MiB): {', '.join(p.name for p in list(removed)[:4])}",
                      file=sys.stderr)

    def _run_subcommand(self, subcommand: str) -> None:
        # Close the W&B run whatever happens: a run left open would be adopted by the next
        # wandb.init in this process (Lightning's WandbLogger reuses `wandb.run`).
        failed = True
        try:
            super()._run_subcommand(subcommand)
            failed = False
        finally:
            for logger in self.trainer.loggers:
                if hasattr(logger, "finish"):
                    logger.finish(exit_code=1 if failed else 0)


def _uses_heads(trainer_config) -> bool:
    """Whether a callback of the config needs the model's attention heads (`find_heads`)."""
    from lit_heads.callbacks.head_monitor import HeadActivationMonitor
    from lit_heads.callbacks.head_restricted import HeadRestrictedFinetuning
    from lit_heads.callbacks.lora import LoRAFinetuning
    from lit_heads.resume import _class_of, _init_args

    for entry in trainer_config.get("callbacks") or []:
        cls = _class_of(entry)
        if cls is None:
            continue
        if issubclass(cls, (HeadActivationMonitor, HeadRestrictedFinetuning)):
            return True
        if issubclass(cls, LoRAFinetuning) and _init_args(entry).get("targets") is None:  # the attention's layers
            return True
    return False


def _loggers(trainer_config) -> list:
    loggers = trainer_config.get("logger")
    return [lg for lg in (loggers if isinstance(loggers, list) else [loggers]) if hasattr(lg, "get")]


def _logger_save_dir(trainer_config) -> str | None:
    return next((lg.init_args.get("save_dir") for lg in _loggers(trainer_config) if lg.get("init_args")), None)


def _continue_wandb_run(trainer_config, run_id: str | None) -> None:
    """Give a resumed fit's W&B logger the checkpoint's run id (W&B resumes it: resume="allow")."""
    from lightning.pytorch.loggers import WandbLogger

    from lit_heads.resume import _class_of

    for entry in _loggers(trainer_config):
        cls = _class_of(entry)
        args = entry.get("init_args")
        if run_id and cls is not None and issubclass(cls, WandbLogger) and args is not None:
            if not (args.get("id") or args.get("version")):
                args.id = run_id


def run_lightning(args: list[str] | None) -> None:
    from lit_heads.callbacks.nan_guard import DefaultNanGuard
    from lit_heads.checkpoint_io import CheckpointSafety

    LitHeadsCLI(
        SFTModule,
        SFTDataModule,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        # Added to every run on top of the config's callbacks (LightningCLI appends trainer_defaults
        # callbacks rather than replacing them, so a config with its own callbacks or plugins keeps
        # them): atomic checkpoint files, clear resume errors and exact mid-epoch resume
        # (CheckpointSafety), and a stop naming the step on a NaN/inf loss (DefaultNanGuard; a
        # NanGuard in the config, e.g. with skip: true, replaces it).
        trainer_defaults={"callbacks": [CheckpointSafety(), DefaultNanGuard()]},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
    )


EXTRA_COMMANDS = {
    "ablate": "lit_heads.commands.ablate",    # mask top/random/bottom-k heads: loss increase, accuracy drop
    "ap": "lit_heads.commands.ap",            # activation pattern of a model on data
    "compare": "lit_heads.commands.compare",  # full vs head-restricted SFT arms, one report
    "compose": "lit_heads.commands.compose",  # fit a pattern change as a combination of others
    "mix": "lit_heads.commands.mix",          # AP-guided mix of basic-task data
    "plan": "lit_heads.commands.plan",        # will it fit? trainable counts and memory per device, no weights
    "study": "lit_heads.commands.study",      # the paper's study end to end
}


def _extra_commands() -> dict:
    """Each extra command is a module with `main(argv)`, imported only when it is run."""
    import importlib

    def runner(module: str):
        return lambda argv: importlib.import_module(module).main(argv)

    return {name: runner(module) for name, module in EXTRA_COMMANDS.items()}


DESCRIPTION = (
    "lit_heads: SFT of causal LMs with attention-head activation patterns. Training subcommands: fit, "
    "validate, test, predict (LightningCLI). Analysis subcommands: ablate, ap, compare, compose, mix, plan, study; "
    "run `lit_heads <command> --help`."
)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    extra = _extra_commands()
    try:
        if argv and argv[0] in extra:
            extra[argv[0]](argv[1:])
        else:
            run_lightning(args)
    except Exception as err:
        cause = _lit_heads_cause(err)
        if cause is None:
            raise
        print(f"lit_heads: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _lit_heads_cause(err: BaseException) -> LitHeadsError | None:
    """Our own error, even when it arrives wrapped: jsonargparse re-raises an exception from a
    callback's or logger's __init__ as "Does not validate against any of the Union subtypes"."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitHeadsError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
