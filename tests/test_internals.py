"""lit_heads._internals: every private API in use exists in the installed versions, and a missing one
is a clear error naming it, not a silent no-op."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lit_heads import _internals
from lit_heads._internals import InternalsError


def test_every_internal_exists_in_the_installed_versions():
    checked = _internals.check_all()
    for name in ("LightningCLI._parse_ckpt_path", "LightningCLI._run_subcommand", "WandbLogger._wandb_init",
                 "FitLoop._combined_loader_states_to_load", "_TrainingEpochLoop._should_check_val_fx",
                 "LRScheduler._last_lr", "OptimizedModule._orig_mod", "cloud_io._is_local_file_protocol"):
        assert name in checked


@pytest.mark.parametrize("call, missing", [
    (lambda: _internals.logger_writes_after_this_batch(SimpleNamespace()), "Trainer._logger_connector"),
    (lambda: _internals.restore_loader_states(SimpleNamespace(fit_loop=SimpleNamespace(_combined_loader=None))),
     "FitLoop._combined_loader_states_to_load"),
    (lambda: _internals.validation_was_interrupted(SimpleNamespace(fit_loop=SimpleNamespace(
        epoch_loop=SimpleNamespace(restarting=True)))), "_TrainingEpochLoop.restarted_on_train_batch_end"),
    (lambda: _internals.set_scheduler_lr(SimpleNamespace(), [0.1]), "LRScheduler._last_lr"),
    (lambda: _internals.check_cli_hooks(type("OldCLI", (), {"_parse_ckpt_path": None})),
     "LightningCLI._run_subcommand"),
    (lambda: _internals.check_wandb_logger(SimpleNamespace(_experiment=None, _offline=True)),
     "WandbLogger._wandb_init"),
])
def test_a_missing_internal_is_named_with_the_tested_versions(call, missing):
    with pytest.raises(InternalsError) as info:
        call()
    text = str(info.value)
    assert missing in text and _internals.TESTED_WITH in text and "pyproject.toml" in text


def test_a_loader_state_is_given_to_the_loader_once():
    given = []
    loader = SimpleNamespace(_load_state_dicts=given.append)
    fit_loop = SimpleNamespace(_combined_loader_states_to_load=[{"sampler": 3}], _combined_loader=loader)
    trainer = SimpleNamespace(fit_loop=fit_loop)
    _internals.restore_loader_states(trainer)
    _internals.restore_loader_states(trainer)
    assert given == [[{"sampler": 3}]] and fit_loop._combined_loader_states_to_load == []


def test_scheduler_rate_correction_is_what_get_last_lr_reports():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    _internals.set_scheduler_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25]


def test_compiled_model_is_unwrapped():
    from lit_heads.heads.layout import unwrap_model

    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.compile(inner)) is inner
    assert _internals.compiled_original(inner) is None


def test_cli_refuses_to_run_when_a_hooked_step_is_gone(monkeypatch, capsys):
    from lightning.pytorch.cli import LightningCLI

    from lit_heads.cli import main

    monkeypatch.delattr(LightningCLI, "_run_subcommand")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "LightningCLI._run_subcommand" in err and "Traceback" not in err
