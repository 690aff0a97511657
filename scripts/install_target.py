"""Where scripts/install.sh installs lit_heads: into the Python that runs this, or into the
project's virtual environment `.venv`.

Prints one line, `active <reason>` or `venv <reason>`:
- `active` when this Python is a virtual environment, when it is not externally managed, or when
  PIP_BREAK_SYSTEM_PACKAGES says to install into it anyway;
- `venv` when it is externally managed (PEP 668: an `EXTERNALLY-MANAGED` file in its standard
  library folder, as on Debian 12+, Ubuntu 23.04+, Fedora 38+ and Homebrew): pip refuses to install
  into it, so install.sh makes (or reuses) `.venv` and installs there.
This is pip's own rule (pip checks the same file and ignores it inside a virtual environment).

`--stdlib DIR` looks for the marker in DIR instead of this Python's standard library folder (the
tests point it at a fake one). Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

MARKER = "EXTERNALLY-MANAGED"


def decide(stdlib: Path, in_venv: bool, break_system: bool) -> tuple[str, str]:
    marker = stdlib / MARKER
    if in_venv:
        return "active", f"{sys.executable} runs in the virtual environment {sys.prefix}"
    if not marker.is_file():
        return "active", f"{sys.executable} is not externally managed"
    if break_system:
        return "active", f"{sys.executable} is externally managed ({marker}), but PIP_BREAK_SYSTEM_PACKAGES is set"
    return "venv", f"{sys.executable} is externally managed (PEP 668: {marker})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_path("stdlib")))
    args = parser.parse_args(argv)
    in_venv = sys.prefix != sys.base_prefix
    break_system = os.environ.get("PIP_BREAK_SYSTEM_PACKAGES", "").lower() in ("1", "true", "yes", "on")
    target, reason = decide(args.stdlib, in_venv, break_system)
    print(target, reason)


if __name__ == "__main__":
    main()
