#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv). Idempotent: re-installs only when pyproject.toml changed.
# torch/torchvision are installed first with exact pins: with nothing installed, a bare `torch` requirement makes
# pip pick a multi-GB build on its own (see README "Installing PyTorch").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ICMIL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"   # "dev" for the test tools

"$PYTHON" - <<'PY' || { echo "icmil needs Python >= 3.10 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS}"
stamp="$VENV/.icmil-installed"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH=(torch==2.9.1 torchvision==0.24.1) ;;
    *) TORCH=(torch==2.14.1 torchvision==0.29.1) ;;
  esac
  echo "[bootstrap] installing ${TORCH[*]} (a few minutes the first time)" >&2
  "${PIP[@]}" install "${TORCH[@]}"
fi
echo "[bootstrap] installing icmil${EXTRAS:+[$EXTRAS]} and its dependencies" >&2
"${PIP[@]}" install -e ".${EXTRAS:+[$EXTRAS]}"
echo "$want" > "$stamp"
