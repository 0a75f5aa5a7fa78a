#!/usr/bin/env bash
# Create (or reuse) the project's isolated environment in .venv and install everything the
# workbench needs. Safe to run again: a stamp file keyed on the dependency files skips the
# install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CBX_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.cbx-installed"
want=$(cat pyproject.toml scripts/setup_env.sh scripts/setup_system.sh scripts/requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# Pin torch first and alone: an unpinned torch pulls gigabytes of CUDA wheels on a CPU box.
$PIP install -q "torch==2.13.0"
# Upstream model code without its exact pins (torch==2.6, torchaudio, gradio, ...).
$PIP install -q --no-deps --no-warn-conflicts -r scripts/requirements-nodeps.txt
$PIP install -q --no-warn-conflicts -e ".[dev]"
# System packages with real speech for the offline eval set (Debian); skipped where apt is absent.
if [ -x scripts/setup_system.sh ]; then scripts/setup_system.sh || echo "[setup] warning: system packages not installed" >&2; fi
echo "$want" > "$stamp"
echo "[setup] environment ready in $VENV" >&2
