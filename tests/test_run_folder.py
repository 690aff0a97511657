"""`fill_run_folder`: what `lit_heads fit` fills in from `trainer.default_root_dir` before the logger
and callbacks are built (the end-to-end move of a whole run is in test_cli.py)."""

from __future__ import annotations

from jsonargparse import Namespace

from lit_heads.run_folder import fill_run_folder

CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def trainer_section(**overrides) -> Namespace:
    section = Namespace(
        default_root_dir="runs/x", enable_checkpointing=None,
        logger=Namespace(class_path="lit_heads.loggers.WandbLogger", init_args=Namespace(save_dir=None, name="n")),
        callbacks=[Namespace(class_path="lit_heads.callbacks.fit_summary.FitSummary",
                             init_args=Namespace(num_generate=None))],
    )
    for key, value in overrides.items():
        section[key] = value
    return section


def test_unset_folders_follow_the_run_folder_and_a_checkpoint_callback_is_added_there():
    section = trainer_section()
    fill_run_folder(section)
    assert section.logger.init_args.save_dir == "runs/x"
    added = section.callbacks[-1]
    assert (added.class_path, added.init_args.dirpath) == (CHECKPOINT, "runs/x/checkpoints")
    assert len(section.callbacks) == 2


def test_explicit_folders_are_kept_and_no_checkpoint_is_added_when_checkpointing_is_off():
    own = Namespace(class_path=CHECKPOINT, init_args=Namespace(dirpath="elsewhere", save_last=True))
    section = trainer_section(callbacks=[own])
    section.logger.init_args.save_dir = "logs"
    fill_run_folder(section)
    assert section.logger.init_args.save_dir == "logs" and section.callbacks == [own]
    assert own.init_args.dirpath == "elsewhere"

    off = trainer_section(enable_checkpointing=False, logger=False)
    fill_run_folder(off)
    assert [c.class_path for c in off.callbacks] == ["lit_heads.callbacks.fit_summary.FitSummary"]


def test_a_checkpoint_callback_without_dirpath_writes_under_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = Namespace(class_path=CHECKPOINT, init_args=Namespace(dirpath=None, save_last=True))
    section = trainer_section(default_root_dir=None, callbacks=[mine])
    fill_run_folder(section)  # no default_root_dir: the working directory, as in Lightning
    assert mine.init_args.dirpath == str(tmp_path / "checkpoints")
    assert section.logger.init_args.save_dir == str(tmp_path)
    assert len(section.callbacks) == 1
