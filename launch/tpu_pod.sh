#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install gkd_jax on every worker, start one config on all
# workers at once (launch/multihost.py), follow the log, fetch the run directory, delete it.
#
#   bash launch/tpu_pod.sh [options] COMMAND [-- extra gkd_jax.main flags]
#
# COMMAND  create  gcloud compute tpus tpu-vm create (accelerator type, runtime version)
#          setup   copy this checkout to every worker, install requirements.txt + jax[tpu]
#          run     start `launch/multihost.py --config=... --workdir=...` on every worker
#                  (in the background; output in ~/gkd_jax_run.log on each worker)
#          logs    follow worker --log-worker's log until the run ends
#          fetch   copy the workdir from worker 0 to --fetch-to
#          delete  delete the slice
#          all     create, setup, run, logs, fetch, then delete (unless --keep)
#
# Options (a flag wins over its environment variable, which wins over the default):
#   --name NAME              slice name                      $GKD_TPU_NAME (required)
#   --project ID             GCP project                     $GKD_PROJECT, else `gcloud config get-value project`
#   --zone ZONE              zone, e.g. us-central2-b        $GKD_ZONE, else `gcloud config get-value compute/zone`
#   --accelerator-type TYPE  e.g. v4-32, v5litepod-16        $GKD_ACCELERATOR_TYPE (v4-32)
#   --version VERSION        TPU runtime (software) version  $GKD_TPU_VERSION (tpu-ubuntu2204-base)
#   --config FILE            experiment config inside this repo (run, all)
#   --workdir DIR            run directory on the workers (run, fetch, all); relative = under
#                            ~/gkd_jax. On a multi-host slice it must be ONE directory every worker
#                            sees (NFS/Filestore or a gcsfuse mount): orbax checkpoints are written
#                            by all workers together. A gs://BUCKET/PATH URL works too (the trainer
#                            writes there through etils.epath; `fetch` copies it with gcloud storage).
#   --python PY              Python >= 3.11 on the workers (python3.11; apt-installed if missing)
#   --spot                   create a Spot TPU
#   --keep                   `all` leaves the slice running
#   --fetch-to DIR           local destination of `fetch` (runs/NAME)
#   --log-worker N           worker whose log `logs` follows (0; only process 0 writes metrics)
#   --dry-run                print the commands (one a line, shell-quoted) instead of running them
#
# Everything is validated before the first gcloud command; errors name the culprit and exit 2.
# Example:
#   bash launch/tpu_pod.sh --name gkd-v4 --project my-proj --zone us-central2-b \
#       --config configs/demo.py --workdir /mnt/shared/demo all -- --config.train.steps=1000
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

q() {  # one word shell-quoted (as is when it is safe), for printing and remote command lines
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

words() {  # all arguments shell-quoted, space separated
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

cmd="" name="${GKD_TPU_NAME:-}" project="${GKD_PROJECT:-}" zone="${GKD_ZONE:-}"
accel="${GKD_ACCELERATOR_TYPE:-v4-32}" version="${GKD_TPU_VERSION:-tpu-ubuntu2204-base}"
config="" workdir="" python="python3.11" spot=0 keep=0 dry_run=0 fetch_to="" log_worker=0
extra=()
while (( $# )); do
  arg="$1"
  shift
  case "$arg" in
    --dry-run) dry_run=1; continue ;;
    --spot) spot=1; continue ;;
    --keep) keep=1; continue ;;
    --) extra=("$@"); break ;;
    --*=*) key="${arg%%=*}" val="${arg#*=}" ;;
    --*) key="$arg"; (( $# )) || die "option $arg needs a value"; val="$1"; shift ;;
    *) [[ -z "$cmd" ]] || die "one command at a time (got '$cmd' and '$arg')"
       cmd="$arg"; continue ;;
  esac
  case "$key" in
    --name) name="$val" ;;
    --project) project="$val" ;;
    --zone) zone="$val" ;;
    --accelerator-type) accel="$val" ;;
    --version) version="$val" ;;
    --config) config="$val" ;;
    --workdir) workdir="$val" ;;
    --python) python="$val" ;;
    --fetch-to) fetch_to="$val" ;;
    --log-worker) log_worker="$val" ;;
    *) die "unknown option '$key' (the options are listed at the top of launch/tpu_pod.sh)" ;;
  esac
done

# ------------------------------------------------------------------ validation (no gcloud yet)
case "$cmd" in
  create|setup|run|logs|fetch|delete|all) ;;
  "") die "no command: give one of create | setup | run | logs | fetch | delete | all" ;;
  *) die "unknown command '$cmd': use create | setup | run | logs | fetch | delete | all" ;;
esac
has() { [[ "$cmd" == all || " $* " == *" $cmd "* ]]; }

[[ -n "$name" ]] || die "no slice name: pass --name NAME or set GKD_TPU_NAME"
# A TPU VM is a Compute Engine VM named after the node, so the name follows Compute Engine's
# resource naming rule (RFC 1035): a lowercase letter, then up to 62 lowercase letters, digits or
# hyphens, not ending with a hyphen: [a-z]([-a-z0-9]{0,61}[a-z0-9])?. (The TPU API's own nodeId
# pattern in gcloud 528's generated client, ^[A-Za-z0-9_.~+%-]+$, is looser; this is the
# rule that also gives a valid hostname.)
if (( ${#name} > 63 )) || [[ ! "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  die "invalid slice name '$name': use 1-63 lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen"
fi
if has create; then
  [[ "$accel" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "invalid --accelerator-type '$accel' (expected e.g. v4-32, v5litepod-16, v5p-8, v6e-8)"
  [[ -n "$version" ]] || die "empty --version (TPU runtime, e.g. tpu-ubuntu2204-base)"
fi
[[ "$log_worker" =~ ^[0-9]+$ ]] || die "--log-worker '$log_worker' must be a worker number"
config_rel=""
if has run; then
  [[ -n "$config" ]] || die "'$cmd' needs --config FILE (an experiment config in this repo)"
  if [[ -f "$config" ]]; then
    config_abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  elif [[ "$config" != /* && -f "$root/$config" ]]; then
    config_abs="$root/$config"
  else
    die "config file '$config' does not exist"
  fi
  [[ "$config_abs" == "$root"/* ]] ||
    die "config file '$config' is outside the repo $root (only the repo is copied to the workers)"
  config_rel="${config_abs#"$root"/}"
fi
if has run fetch; then
  [[ -n "$workdir" ]] || die "'$cmd' needs --workdir DIR (the run directory on the workers)"
  if [[ "$workdir" == gs://* ]]; then  # the trainer writes there through etils.epath
    [[ "$workdir" =~ ^gs://[a-z0-9][a-z0-9._-]*[a-z0-9](/.*)?$ ]] ||
      die "--workdir '$workdir': not a gs://BUCKET/PATH URL"
  fi
fi
jax_version="$(sed -n 's/^jax==//p' "$root/requirements.txt")"
[[ -n "$jax_version" ]] || die "no 'jax==VERSION' pin in $root/requirements.txt"

gcloud_value() {  # `gcloud config get-value KEY`, empty when unset or gcloud is missing
  command -v gcloud >/dev/null 2>&1 || return 0
  local v
  v="$(gcloud config get-value "$1" 2>/dev/null || true)"
  [[ "$v" == "(unset)" ]] || printf '%s' "$v"
}
[[ -n "$project" ]] || project="$(gcloud_value project)"
[[ -n "$project" ]] ||
  die "no GCP project: pass --project ID, set GKD_PROJECT, or run 'gcloud config set project ID'"
[[ -n "$zone" ]] || zone="$(gcloud_value compute/zone)"
[[ -n "$zone" ]] ||
  die "no zone: pass --zone ZONE, set GKD_ZONE, or run 'gcloud config set compute/zone ZONE'"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "invalid --zone '$zone' (expected e.g. us-central2-b)"
(( dry_run )) || command -v gcloud >/dev/null 2>&1 ||
  die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"

# ------------------------------------------------------------------ the commands
run() {  # prints (dry run) or echoes to stderr and runs one command
  if (( dry_run )); then
    words "$@"; echo
  else
    echo "+ $(words "$@")" >&2
    "$@"
  fi
}
at=(--project="$project" --zone="$zone")
remote_dir="gkd_jax"  # under the workers' home directories
tarball="${TMPDIR:-/tmp}/gkd_jax-$name.tgz"

do_create() {
  local flags=()
  (( spot )) && flags+=(--spot)
  run gcloud compute tpus tpu-vm create "$name" "${at[@]}" --accelerator-type="$accel" \
      --version="$version" "${flags[@]}"
}

do_setup() {
  run tar -czf "$tarball" -C "$root" --exclude=./.git --exclude='./.venv*' --exclude=./.whl --exclude=./runs \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_dir.tgz" "${at[@]}" --worker=all
  local py
  py="$(q "$python")"
  run gcloud compute tpus tpu-vm ssh "$name" "${at[@]}" --worker=all --command="set -e; \
command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv; }; \
mkdir -p ~/$remote_dir && tar -xzf ~/$remote_dir.tgz -C ~/$remote_dir && cd ~/$remote_dir && \
PYTHON=$py bash launch/setup.sh && .venv/bin/pip install -q $(q "jax[tpu]==$jax_version")"
}

do_run() {
  local line
  line="$(words .venv/bin/python launch/multihost.py --distributed=on --config="$config_rel" \
      --workdir="$workdir" "${extra[@]}")"
  run gcloud compute tpus tpu-vm ssh "$name" "${at[@]}" --worker=all --command="cd ~/$remote_dir && \
nohup $line > ~/gkd_jax_run.log 2>&1 < /dev/null & echo \$! > ~/gkd_jax_run.pid"
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "$name" "${at[@]}" --worker="$log_worker" \
      --command='tail -n +1 --pid="$(cat ~/gkd_jax_run.pid)" -f ~/gkd_jax_run.log'
}

do_fetch() {
  local src="$workdir" dest="${fetch_to:-$root/runs/$name}"
  run mkdir -p "$dest"
  if [[ "$src" == gs://* ]]; then  # the workers wrote to the bucket: copy from there
    run gcloud storage cp --recursive "$src" "$dest"
    return
  fi
  [[ "$src" == /* ]] || src="$remote_dir/$src"
  run gcloud compute tpus tpu-vm scp --recurse "$name:$src" "$dest" "${at[@]}" --worker=0
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$name" "${at[@]}" --quiet
}

case "$cmd" in
  all)
    do_create
    (( dry_run )) || trap 'echo "tpu_pod.sh: stopped; the slice may still exist: bash launch/tpu_pod.sh --name $name --project $project --zone $zone delete" >&2' ERR
    do_setup
    do_run
    do_logs
    do_fetch
    if (( keep )); then
      echo "tpu_pod.sh: kept $name (delete it with: bash launch/tpu_pod.sh --name $name --project $project --zone $zone delete)" >&2
    else
      do_delete
    fi
    ;;
  *) "do_$cmd" ;;
esac
