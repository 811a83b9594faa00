# Sourced by scripts/demo and scripts/test: make .venv with streamq and the given extras installed.
# Usage: . scripts/_setup.sh EXTRAS   (e.g. "plot" or "dev,plot")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=".venv/.streamq-installed-$1"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$1]"
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
