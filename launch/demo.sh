#!/usr/bin/env bash
# The main job: sets up the environment, then distils SmolLM2-135M-Instruct into a
# 10-layer pruned student on XSum (configs/demo.py) and prints before/after numbers.
# Extra arguments go to gkd_jax.main, e.g. `bash launch/demo.sh --config.train.steps=10`.
# WORKDIR (default runs/demo-<time>) holds checkpoints, metrics, curves.png and the HF export.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
workdir="${WORKDIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
exec .venv/bin/python -m gkd_jax.main --config=configs/demo.py --workdir="$workdir" "$@"
