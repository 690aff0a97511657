"""Atomic writes: a reader, or a run killed half-way, sees the old file or the new one, never a
half-written one. Every file and folder lit_heads produces goes through here.

Temporary files and folders are hidden siblings of their target named `.<target>.<pid>-<random>.tmp`
(the pid of the writing process), with the mode a plain `open()`/`mkdir()` would give under the
current umask. A process killed mid-write (SIGKILL, OOM) leaves its temp behind; `remove_stale_temps`
removes those whose writer is gone (`lit_heads fit` calls it on its run folders while it holds the run
lock, see `lit_heads.run_lock`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_TEMP_SUFFIX = ".tmp"
# .<name>.<pid>-<8 chars of tempfile's alphabet>.tmp
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")
# Written by lit_heads 0.1.0 before temp names carried the pid: files `.<name>.<random>.tmp`, folders
# `.<name>-<random>` and `.<name>-old-<random>`.
_LEGACY_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_LEGACY_DIR = re.compile(r"^\.(?P<name>.+?)-(?:old-)?[a-z0-9_]{8}$")
_MAX_DEPTH = 4  # folders below the run folder that remove_stale_temps looks in


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temp file in the same directory, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable (the directory entry); not possible on every OS/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    # Read without changing it where the kernel tells (Linux >= 4.7): os.umask() sets it for the
    # whole process for an instant, which another thread creating a file could observe.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def temp_dir_for(target: str | os.PathLike) -> Path:
    """A new empty temp folder next to `target` (see the module docstring), with the mode `mkdir`
    would give (mkdtemp alone makes it 0700, so a shared cache or export would be private)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=_TEMP_SUFFIX, dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `target`; on success it replaces `target`, on failure it is
    deleted and `target` is untouched.

    An existing `target` is swapped with the new folder in one step (Linux `renameat2` with
    `RENAME_EXCHANGE`), so a reader always finds a complete `target`. Where that is not available
    (another OS, or a filesystem without it, e.g. some network filesystems) the old folder is
    renamed away and the new one renamed into place: between the two renames, a few microseconds,
    `target` does not exist.
    """
    target = Path(target)
    tmp = temp_dir_for(target)
    try:
        yield tmp
        if not target.exists() and not target.is_symlink():
            os.replace(tmp, target)
        elif not _rename_exchange(tmp, target):
            old = temp_dir_for(target)
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the old folder


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically; False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_stale_temps(folder: str | os.PathLike) -> dict[Path, int]:
    """Remove, below `folder`, the temp files and folders of atomic writes whose process is gone
    (killed mid-write). Only names this module makes are touched, and only when the pid in the name
    is not a live process (or is this process's own pid, reused from an earlier life: this process
    has nothing in flight when it calls this). Temps of lit_heads 0.1.0 (no pid in the name) are
    removed too: a folder only next to a sibling of the same name. Call it only on folders no other
    lit_heads process writes to (`lit_heads fit` holds the run lock). Returns what was removed, with
    the bytes it held."""
    removed = {}
    top = len(Path(folder).parts)
    for root, dirs, files in os.walk(folder):
        # Run outputs lie at most a few folders deep; never walk a W&B run, a .git or a .venv.
        if len(Path(root).parts) - top >= _MAX_DEPTH:
            dirs[:] = []
        for name in list(dirs):
            if _stale(name, is_dir=True, siblings=dirs):
                path = Path(root, name)
                removed[path] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
                shutil.rmtree(path, ignore_errors=True)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "wandb" and Path(root, d) not in removed]
        for name in files:
            if _stale(name, is_dir=False, siblings=dirs + files):
                path = Path(root, name)
                with contextlib.suppress(FileNotFoundError):
                    size = path.stat().st_size
                    path.unlink()
                    removed[path] = size
    return removed


def _stale(name: str, is_dir: bool, siblings: list[str]) -> bool:
    match = _TEMP_NAME.match(name)
    if match:
        return not _alive(int(match["pid"]))
    if is_dir:
        legacy = _LEGACY_DIR.match(name)
        return bool(legacy) and legacy["name"] in siblings
    return bool(_LEGACY_FILE.match(name))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def writable_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """Create `path` if needed and check that files can be written in it, before any work starts.
    With `create=False` nothing is created: a missing `path` passes when its nearest existing parent
    is a folder this process may create it in (a command checks this first and creates the folder
    only when it writes its results)."""
    from lit_heads.errors import ConfigError

    out = Path(path)
    try:
        if not create and not out.exists():
            parent = next(p for p in out.absolute().parents if p.exists())
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))
            return out
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"Output folder {out} is not writable ({err.strerror}). Choose another --output.") from err
    return out
