"""Run a short Python program (a model's generated answer) in a separate, limited process.

This guards against the usual accidents of generated code (infinite loops, runaway memory or
output, writes into the working directory); it is not a security boundary against hostile code.
The child runs `python -I` (isolated: no user site, no PYTHON* variables), in a fresh temporary
directory, with no stdin, a wall-clock timeout, and on POSIX limits on CPU time, memory and the size
of what it prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

try:
    import resource
except ImportError:  # Windows: only the timeout applies
    resource = None

DEFAULT_TIMEOUT_S = 2.0
_MEMORY_BYTES = 512 * 1024 * 1024
_OUTPUT_BYTES = 64 * 1024


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limit_child(timeout_s: float) -> None:
    # Runs in the child between fork and exec. RLIMIT_FSIZE caps stdout too, because stdout is a
    # file here, so `while True: print(1)` dies instead of filling memory or disk.
    cpu = max(1, int(timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_BYTES, _MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_OUTPUT_BYTES, _OUTPUT_BYTES))


def run_python(code: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> SandboxResult:
    """Run `code` with `python -I -c` and return what it printed; never raises for the program's own
    errors (they show up as a non-zero return code and stderr)."""
    if "\0" in code:
        # A generation with a NUL byte cannot be passed as an argument; it is not a valid program anyway.
        return SandboxResult("", "program text contains a NUL byte", None, False)
    with (tempfile.TemporaryDirectory(prefix="lit_heads_sandbox_") as workdir,
          tempfile.TemporaryFile(dir=workdir) as out, tempfile.TemporaryFile(dir=workdir) as err):
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8"}
        try:
            completed = subprocess.run(
                [sys.executable, "-I", "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                timeout=timeout_s,
                preexec_fn=(lambda: _limit_child(timeout_s)) if resource is not None else None,
            )
            returncode, timed_out = completed.returncode, False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        out.seek(0)
        err.seek(0)
        return SandboxResult(
            out.read().decode("utf-8", errors="replace"),
            err.read().decode("utf-8", errors="replace"),
            returncode,
            timed_out,
        )
