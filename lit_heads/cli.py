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
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the model's own tokenizer; one name configures both.
        parser.link_arguments("model.model", "data.tokenizer")

    def before_instantiate_classes(self) -> None:
        # Before the logger (first) and the model are built: bad data fails in a second, before a
        # model loads or a W&B run folder appears; the run folder's defaults are filled in.
        from lit_heads.data.datamodule import check_data_sources
        from lit_heads.run_folder import fill_run_folder

        config = self.config[self.config.subcommand]
        check_data_sources(config.data)
        fill_run_folder(config.trainer)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyper-parameters with torch.load before the Trainer (and
        # its CheckpointIO with clear errors) sees the file.
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            from lit_heads.checkpoint_io import unreadable_checkpoint

            raise unreadable_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), err) from err

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
