"""Atomic files and folders: no moment without the target, the umask's modes, and the removal of
temps that killed writers left behind (only theirs, never a live writer's)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lit_heads import atomic
from lit_heads.atomic import atomic_dir, atomic_write, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]

# Starts an atomic write (file or folder) in `target`'s folder, then dies by SIGKILL or waits.
WRITER = r"""
import os, signal, sys, time
from lit_heads.atomic import atomic_dir, atomic_write
target, kind, end = sys.argv[1:4]
def finish():
    print("writing", flush=True)
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
if kind == "file":
    atomic_write(target, lambda f: (f.write(b"half"), f.flush(), finish()))
else:
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        finish()
"""


def writer(target: Path, kind: str, end: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind, end], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "writing"
    return proc


@pytest.mark.slow
def test_temps_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    ckpts, run = tmp_path / "run" / "checkpoints", tmp_path / "run"
    (ckpts).mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"good")
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    for target, kind in ((ckpts / "last.ckpt", "file"), (run / "export", "dir")):
        killed = writer(target, kind, "kill")
        assert killed.wait(60) == -signal.SIGKILL
    live = writer(run / "fit_summary.json", "file", "wait")
    try:
        leftovers = sorted(p.name for p in run.rglob(".*"))
        assert len(leftovers) == 3, leftovers  # the two dead writers' temps and the live one's
        # Names that only look similar, and legacy temps of lit_heads 0.1.0 (no pid in the name).
        keep = [run / ".hidden.tmp", run / ".export-notours", ckpts / ".last.ckpt.12345678.tmp.bak"]
        keep[0].write_text("x"), keep[1].mkdir(), keep[2].write_text("x")
        legacy = [ckpts / ".last.ckpt.k2j_9x0a.tmp", run / ".export-ab12cd34", run / ".export-old-ab12cd34"]
        legacy[0].write_text("x"), legacy[1].mkdir(), legacy[2].mkdir()

        removed = remove_stale_temps(run)

        assert sorted(p.name for p in removed) == sorted(
            [n for n in leftovers if f".{live.pid}-" not in n] + [p.name for p in legacy])
        assert all(not p.exists() for p in removed)
        assert all(p.exists() for p in keep)
        assert [p.name for p in run.glob(f".fit_summary.json.{live.pid}-*.tmp")]  # the live writer's temp stays
        assert (ckpts / "last.ckpt").read_bytes() == b"good" and (run / "export" / "config.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_own_pid_in_a_temp_name_is_an_earlier_life(tmp_path):
    """After a container restart a new run may get the pid of the killed one."""
    own = tmp_path / f".last.ckpt.{os.getpid()}-abcd_123.tmp"
    own.write_text("x")
    assert list(remove_stale_temps(tmp_path)) == [own]


def test_atomic_dir_replaces_an_existing_folder_without_a_moment_where_it_is_missing(tmp_path, monkeypatch):
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("old")
    checks = []
    real_replace, real_rename = os.replace, os.rename

    def watched(real):
        def call(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            checks.append((target / "config.json").is_file())
            return result
        return call

    monkeypatch.setattr(atomic.os, "replace", watched(real_replace))
    monkeypatch.setattr(atomic.os, "rename", watched(real_rename))
    exchanged = []
    real_exchange = getattr(atomic, "_rename_exchange", None)
    if real_exchange is not None:
        monkeypatch.setattr(atomic, "_rename_exchange",
                            lambda a, b: exchanged.append(real_exchange(a, b)) or exchanged[-1])
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new")
    if exchanged == [False]:
        pytest.skip("this filesystem cannot exchange two paths (renameat2 RENAME_EXCHANGE); the fallback has a gap")
    assert all(checks), "the export folder was missing after a rename"
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the old folder is gone, no temp left


def test_atomic_dir_fallback_without_exchange_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_rename_exchange", lambda a, b: False)
    target = tmp_path / "export"
    for text in ("old", "new"):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text(text)
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_folders_and_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "export") as tmp:
            (tmp / "config.json").write_text("{}")
        atomic_write(tmp_path / "last.ckpt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o666 & ~umask


def test_a_failed_atomic_dir_leaves_the_target_and_no_temp(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("save_pretrained failed")
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
