#!/usr/bin/env bash
# benchmarks/accelerator.py on a bare accelerator machine: the carried wheels in .whl/ (if any)
# go to $SITE (default /tmp/site) on PYTHONPATH; the tables also go to $OUT/accelerator.md when
# $OUT is set. Extra arguments go to the script (e.g. --dry-run, --budget-s 300).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/accelerator.py "$@"
