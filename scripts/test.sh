#!/usr/bin/env bash
# The test command: lint (ruff), format check, type check (mypy on icmil/), then the test suite.
# Tests start their own servers (PostgreSQL, S3, MLflow) on 127.0.0.1; this installs PostgreSQL's server
# binaries and Chromium (for the report's browser test) from Debian when they are missing and we are root.
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
VENV="${ICMIL_VENV:-.venv}"

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing PostgreSQL server binaries (apt-get)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "[test] PostgreSQL server binaries (initdb, pg_ctl) are needed: install the 'postgresql' package" >&2
    exit 2
  fi
fi

# The report test opens RUN/report.html in a real headless browser (Debian's chromium); without it that test
# is skipped with the reason. As root with apt-get, install it here so CI runs it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium for the report's browser test (apt-get)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[test] chromium not found and not root: the report's browser test will be skipped" >&2
  fi
fi

echo "[test] ruff check + format" >&2
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "[test] mypy icmil/" >&2
"$VENV/bin/mypy" icmil
echo "[test] pytest" >&2
exec "$VENV/bin/pytest" "$@"
