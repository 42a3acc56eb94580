#!/usr/bin/env bash
# The main job: the whole ICMIL pipeline through Kubeflow's local runner on generated slides, MLflow in sqlite.
# Usage: bash scripts/demo.sh [CONFIG] [--set key=value ...]   (default config: configs/demo.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
config="configs/demo.yaml"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then config="$1"; shift; fi
exec "${ICMIL_VENV:-.venv}/bin/icmil" run "$config" "$@"
