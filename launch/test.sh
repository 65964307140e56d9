#!/usr/bin/env bash
# Sets up the environment and runs the test suite on CPU JAX with 8 fake devices.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow" -x`.
# Test files run in PYTEST_WORKERS processes (default 2, pytest-xdist; 0 = in this process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
