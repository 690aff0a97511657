"""`ruff check .` passes on the repository (the rules are in pyproject.toml: E, F, W, I at 120 columns). ruff is
in the `test` extra; the check takes about a second, so it stays in the inner loop (`-m "not slow"`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"ruff check . failed:\n{result.stdout}{result.stderr}"
