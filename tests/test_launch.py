"""launch/tpu_pod.sh (dry run, validation before any gcloud call, the real call sequence against a
fake gcloud) and launch/local.sh's argument checks."""

import os
import re
import shlex
import shutil
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%q ' "$@" >> "$GCLOUD_CALLS"; echo >> "$GCLOUD_CALLS"
if [[ "$1 $2" == "config get-value" ]]; then
  case "$3" in
    project) echo "${FAKE_PROJECT:-(unset)}" ;;
    compute/zone) echo "${FAKE_ZONE:-(unset)}" ;;
  esac
fi
"""
GOOD = ["--name", "gkd-pod", "--project", "my-proj", "--zone", "us-central2-b",
        "--accelerator-type", "v4-32", "--config", "configs/demo.py", "--workdir", "/mnt/nfs/run1"]


@pytest.fixture
def pod(tmp_path):
  """Runs tpu_pod.sh with a fake gcloud first on PATH; -> (run(args, **env), calls())."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  calls_file = tmp_path / "calls"
  base = {k: v for k, v in os.environ.items() if not k.startswith("GKD_")}
  base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_CALLS=str(calls_file),
              CLOUDSDK_CONFIG=str(tmp_path / "gcloud_config"), TMPDIR=str(tmp_path))

  def run(args, **env):
    return subprocess.run(["bash", POD, *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)

  def calls():
    if not calls_file.exists():
      return []
    return [shlex.split(line) for line in calls_file.read_text().splitlines()]

  return run, calls


def _lines(stdout):
  return [shlex.split(line) for line in stdout.splitlines()]


def test_dry_run_prints_the_whole_pod_lifecycle(pod):
  run, calls = pod
  p = run(["--dry-run", *GOOD, "all", "--", "--config.train.steps=1000",
           "--gin_bindings=gkd.lmbda = 0.5"])
  assert p.returncode == 0, p.stderr
  lines = _lines(p.stdout)
  gcloud = [x for x in lines if x[0] == "gcloud"]
  assert [x[4] for x in gcloud] == ["create", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
  where = ["--project=my-proj", "--zone=us-central2-b"]
  assert gcloud[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "gkd-pod", *where,
                       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  setup, start, logs = gcloud[2], gcloud[3], gcloud[4]
  for c in (setup, start):
    assert c[5] == "gkd-pod" and "--worker=all" in c and all(w in c for w in where)
  setup_cmd = next(a for a in setup if a.startswith("--command="))
  jax_pin = next(x for x in open(os.path.join(ROOT, "requirements.txt")) if x.startswith("jax=="))
  assert "bash launch/setup.sh" in setup_cmd and f"jax[tpu]=={jax_pin[5:].strip()}" in setup_cmd
  start_cmd = shlex.split(next(a for a in start if a.startswith("--command="))[len("--command="):])
  i = start_cmd.index("launch/multihost.py")
  assert start_cmd[i - 1] == ".venv/bin/python" and start_cmd[i + 1:i + 6] == [
      "--distributed=on", "--config=configs/demo.py", "--workdir=/mnt/nfs/run1",
      "--config.train.steps=1000", "--gin_bindings=gkd.lmbda = 0.5"]
  assert "--worker=0" in logs and "gkd_jax_run.log" in logs[-1]
  assert gcloud[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "gkd-pod", *where,
                        "--quiet"]
  assert calls() == []  # a dry run with project and zone given never calls gcloud


def test_project_and_zone_from_env_then_gcloud_config(pod):
  run, calls = pod
  args = ["--dry-run", "--name", "gkd-pod", "create"]
  p = run(args, GKD_PROJECT="env-proj", GKD_ZONE="europe-west4-a")
  assert p.returncode == 0 and "--project=env-proj --zone=europe-west4-a" in p.stdout, p.stderr
  assert calls() == []
  p = run(args, FAKE_PROJECT="cfg-proj", FAKE_ZONE="us-east5-a")
  assert p.returncode == 0 and "--project=cfg-proj --zone=us-east5-a" in p.stdout, p.stderr
  assert [c[:3] for c in calls()] == [["config", "get-value", "project"],
                                      ["config", "get-value", "compute/zone"]]


def _without(args, *names):
  out, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a in names:
      skip = True
    else:
      out.append(a)
  return out


BAD = {
    "missing config": (GOOD[:8] + ["--config", "configs/nope.py"] + GOOD[10:], "all", {},
                       "config file 'configs/nope.py' does not exist"),
    "config outside the repo": (GOOD[:8] + ["--config", "/etc/hostname"] + GOOD[10:], "all", {},
                                "'/etc/hostname' is outside the repo"),
    "no config": (_without(GOOD, "--config"), "run", {}, "'run' needs --config FILE"),
    "uppercase name": (["--name", "Gkd-Pod"] + GOOD[2:], "create", {}, "invalid slice name 'Gkd-Pod'"),
    "name starts with a digit": (["--name", "1pod"] + GOOD[2:], "all", {}, "invalid slice name '1pod'"),
    "name ends with a hyphen": (["--name", "pod-"] + GOOD[2:], "create", {}, "invalid slice name 'pod-'"),
    "name with underscore": (["--name", "my_pod"] + GOOD[2:], "create", {}, "invalid slice name 'my_pod'"),
    "name of 64 chars": (["--name", "a" * 64] + GOOD[2:], "create", {}, "invalid slice name 'a{64}'"),
    "no name": (GOOD[2:], "create", {}, "no slice name: pass --name NAME or set GKD_TPU_NAME"),
    "no project": (_without(GOOD, "--project"), "all", {},
                   "no GCP project: pass --project ID, set GKD_PROJECT"),
    "no zone": (_without(GOOD, "--zone"), "all", {}, "no zone: pass --zone ZONE, set GKD_ZONE"),
    "bad zone": (GOOD[:4] + ["--zone", "uscentral"] + GOOD[6:], "create", {}, "invalid --zone 'uscentral'"),
    "bad accelerator": (GOOD[:6] + ["--accelerator-type", "tpu-32"] + GOOD[8:], "create", {},
                        "invalid --accelerator-type 'tpu-32'"),
    "bad gs workdir": (GOOD[:10] + ["--workdir", "gs://Bucket"], "run", {}, "not a gs://BUCKET/PATH URL"),
    "no workdir": (GOOD[:10], "run", {}, "'run' needs --workdir DIR"),
    "unknown command": (GOOD, "launch", {}, "unknown command 'launch'"),
    "unknown option": (GOOD + ["--acelerator-type=v4-8"], "create", {}, "unknown option '--acelerator-type'"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("dry", [True, False], ids=["dry_run", "real"])
def test_bad_input_fails_before_any_gcloud_command(pod, case, dry):
  run, calls = pod
  args, cmd, env, match = BAD[case]
  p = run((["--dry-run"] if dry else []) + args + [cmd], **env)
  assert p.returncode == 2, (p.stdout, p.stderr)
  assert p.stdout == ""  # no command printed
  assert re.search("tpu_pod.sh: error: .*" + match, p.stderr), p.stderr
  # at most the read-only `gcloud config get-value` lookups of an unset project / zone
  assert all(c[:2] == ["config", "get-value"] for c in calls()), calls()


def test_real_run_calls_gcloud_in_order_and_ships_the_repo(pod, tmp_path):
  run, calls = pod
  fetched = tmp_path / "fetched"
  p = run(GOOD + ["--spot", "--keep", f"--fetch-to={fetched}", "all", "--",
                  "--config.train.steps=5"])
  assert p.returncode == 0, p.stderr
  got = calls()
  assert [c[3] for c in got] == ["create", "scp", "ssh", "ssh", "ssh", "scp"]  # --keep: no delete
  assert "--spot" in got[0] and "gkd-pod" in got[0]
  assert "kept gkd-pod" in p.stderr
  with tarfile.open(tmp_path / "gkd_jax-gkd-pod.tgz") as tar:
    names = set(tar.getnames())
  assert {"./gkd_jax/train.py", "./launch/multihost.py", "./configs/demo.py",
          "./requirements.txt"} <= names
  assert not any(n.startswith(("./.venv", "./.git/", "./runs/")) for n in names)
  assert got[1][4:6] == [str(tmp_path / "gkd_jax-gkd-pod.tgz"), "gkd-pod:gkd_jax.tgz"]
  assert got[-1][4:7] == ["--recurse", "gkd-pod:/mnt/nfs/run1", str(fetched)]
  assert fetched.is_dir()


def test_gs_workdir_runs_there_and_is_fetched_from_the_bucket(pod, tmp_path):
  run, calls = pod
  fetched = tmp_path / "fetched"
  p = run(GOOD[:10] + ["--workdir", "gs://bucket/run1", f"--fetch-to={fetched}", "--keep", "all"])
  assert p.returncode == 0, p.stderr
  got = calls()
  assert any("--workdir=gs://bucket/run1" in " ".join(c) for c in got), got  # passed as given
  assert got[-1] == ["storage", "cp", "--recursive", "gs://bucket/run1", str(fetched)]


def test_real_run_without_gcloud_fails_clearly(tmp_path):
  bin_dir = tmp_path / "bin"  # the tools the script needs, but no gcloud
  bin_dir.mkdir()
  for tool in ("dirname", "sed"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  env = {k: v for k, v in os.environ.items() if not k.startswith("GKD_")}
  env["PATH"] = str(bin_dir)
  p = subprocess.run(["/bin/bash", POD, *GOOD, "create"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and "gcloud not found" in p.stderr, p.stderr


def test_local_sh_checks_its_config(tmp_path):
  local = os.path.join(ROOT, "launch", "local.sh")
  p = subprocess.run(["bash", local, f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and "pass --config=configs/NAME.py" in p.stderr
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run(["bash", local, "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0 and "configs/nope.py" in p.stdout + p.stderr
