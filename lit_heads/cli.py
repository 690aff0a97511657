"""`lit_heads`: the command-line entry point.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands: YAML configs, stacked
`--config` files, `--print_config`, dotted overrides and the Trainer's own flags for devices,
strategy and precision. The analysis commands (`ap`, ...) are plain jsonargparse commands that read
the same config style; they are listed in `EXTRA_COMMANDS`.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_heads.data import SFTDataModule
from lit_heads.errors import LitHeadsError
from lit_heads.module import SFTModule


class SaveConfigToLoggers(SaveConfigCallback):
    """Save the resolved config next to the run (overwriting the previous run's copy) and send it to
    the loggers, so the W&B run holds the exact config that produced it."""

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

    def _finish_loggers(self) -> None:
        for logger in self.trainer.loggers:
            if hasattr(logger, "finish"):
                logger.finish()

    after_fit = after_validate = after_test = after_predict = _finish_loggers


def run_lightning(args: list[str] | None) -> None:
    LitHeadsCLI(
        SFTModule,
        SFTDataModule,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=args,
    )


EXTRA_COMMANDS = {
    "ap": "lit_heads.commands.ap",            # activation pattern of a model on data
    "compare": "lit_heads.commands.compare",  # full vs head-restricted SFT arms, one report
    "compose": "lit_heads.commands.compose",  # fit a pattern change as a combination of others
    "mix": "lit_heads.commands.mix",          # AP-guided mix of basic-task data
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
    "validate, test, predict (LightningCLI). Analysis subcommands: ap, compare, compose, mix, study; "
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
    except LitHeadsError as err:
        print(f"lit_heads: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
