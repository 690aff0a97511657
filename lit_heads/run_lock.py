"""One `lit_heads fit` per run folder at a time.

Two fits writing into one folder interleave `metrics.jsonl` and overwrite each other's `last.ckpt`
without any error. `lit_heads fit` therefore holds an exclusive `flock` on `<folder>/.lit_heads.lock`
for each of its run folders from before the model loads until it exits. The kernel releases the lock
when the process ends in any way, SIGKILL and OOM included, so a killed run never leaves a stale lock
(the file stays, empty of meaning: only the lock on it counts). The lock file names the holder (pid,
host, start time, command) for the message the second fit gets.

Under DDP the process that launches the run (global rank 0, node 0) holds the lock for all ranks;
the other ranks neither take nor check it. `flock` works across hosts on NFS v4 and most cluster
filesystems (on NFS, Linux emulates it with POSIX locks); where a filesystem does not support it the
run proceeds with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from lit_heads.errors import LitHeadsError

LOCK_NAME = ".lit_heads.lock"


class RunFolderInUse(LitHeadsError):
    """Another live `lit_heads fit` writes into the same run folder."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderInUse(
                    f"Run folder {self.folder} is in use by another lit_heads fit ({holder or 'holder unknown'}). "
                    "Two fits into one folder would interleave its metrics.jsonl and overwrite each other's "
                    "last.ckpt. Wait for that fit to end (or stop it), or give this one another folder, e.g. "
                    "--trainer.default_root_dir runs/other."
                ) from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                print(f"lit_heads: warning: cannot lock {self.path} ({err.strerror}): this filesystem does not "
                      "support file locks, so nothing stops a second fit from writing into this folder.",
                      file=sys.stderr)
                return self
            raise
        os.ftruncate(fd, 0)
        os.write(fd, _holder().encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def launching_process() -> bool:
    """True in the process that starts a run: global rank 0 on node 0 (also before DDP starts, from
    the launchers' environment variables), where the run lock is held for every rank."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")


def root_folders(folders) -> list[Path]:
    """The given folders without those inside another one of them (absolute, sorted)."""
    paths = sorted({Path(f).resolve() for f in folders if f})
    return [p for p in paths if not any(q != p and q in p.parents for q in paths)]


def _holder() -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = " ".join(["lit_heads", *sys.argv[1:]])[:300]
    return f"pid {os.getpid()} on host {socket.gethostname()}, started {started}: {command}\n"


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 1000, 0).decode(errors="replace").strip()
    return ""
