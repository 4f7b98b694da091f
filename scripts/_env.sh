# Sourced by scripts/demo and scripts/test: create or refresh the virtual environment, idempotently.
# ODEFORGE_VENV (default .venv) picks the venv; TORCH_INDEX_URL an alternative torch wheel index
# (e.g. https://download.pytorch.org/whl/cpu for CPU-only machines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${ODEFORGE_VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PY" -m pip install --upgrade pip "setuptools>=68" wheel
  "$PY" -m pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
stamp="$VENV/.odeforge-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]] || ! "$PY" -c 'import service, node_engine, worker' 2>/dev/null \
   || [[ ! -x "$VENV/bin/odeforge" ]]; then
  "$PY" -m pip install -e ".[test]"
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
