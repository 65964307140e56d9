#!/usr/bin/env bash
# Runs one experiment config on this machine (CPU, or one GPU/TPU if jax sees it): sets up
# .venv (launch/setup.sh), then `python -m gkd_jax.main "$@"`.
#
#   bash launch/local.sh --config=configs/NAME.py [--workdir=DIR] [--config.a.b=v] [--gin_bindings='a.b = v']
#
# Without --workdir the run goes to runs/<config name>-<time>. Re-running with the same
# --workdir resumes from its latest checkpoint. JAX_PLATFORMS=cpu forces the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="" workdir_given=0 prev=""
for arg in "$@"; do
  case "$arg" in
    --config=*) config="${arg#--config=}" ;;
    --workdir=*|--workdir) workdir_given=1 ;;
  esac
  [[ "$prev" == --config ]] && config="$arg"
  prev="$arg"
done
if [[ -z "$config" ]]; then
  echo "local.sh: error: pass --config=configs/NAME.py (see configs/)" >&2
  exit 2
fi
bash "$root/launch/setup.sh"
cd "$root"
args=("$@")
if (( ! workdir_given )); then
  stem="$(basename "${config%%:*}" .py)"
  args+=(--workdir="runs/$stem-$(date +%Y%m%d-%H%M%S)")
fi
exec .venv/bin/python -m gkd_jax.main "${args[@]}"
