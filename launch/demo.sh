#!/usr/bin/env bash
# The main job. Sets up the environment, then runs the current demo:
# the fused-vs-unfused divergence benchmark (until the trainer's configs/demo.py lands).
# Extra arguments go to the benchmark, e.g. `bash launch/demo.sh --sizes 1024 4096`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python benchmarks/divergences.py "$@"
