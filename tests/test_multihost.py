"""Multi-process training: two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives,
4 fake devices each) train on one 8-device mesh through launch/multihost.py and end where one
process with 8 devices ends on the same global batches."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from gkd_jax import train
from test_train import ROOT, tiny_config

MULTIHOST = os.path.join(ROOT, "launch", "multihost.py")
# lmbda 0.5 over 4 steps, seed 3: step 1 is on-policy, steps 2-4 train on the dataset. The
# on-policy step comes first, where both runs hold bitwise-equal parameters: after that,
# all-reduce rounding may flip a sampled token (seen with seed 0, on-policy at steps 3-4, on
# an AMD EPYC: step 4's loss 1.926e-5 vs 1.906e-5 and parameters 3e-4 apart).
OVERRIDES = {"seed": 3, "gkd.lmbda": 0.5, "train.steps": 4, "train.ckpt_every": 2, "train.keep_ckpts": 2,
             "optim.lr": 1e-3, "optim.warmup_steps": 0, "eval.num_examples": 4,
             "eval.batch_size": 4, "eval.max_new_tokens": 4, "eval.teacher": False,
             "eval.at_start": False, "train.export_hf": True}
TIMEOUT_S = 420


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", **extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(args, tmp_path, n=2):
  """Starts launch/multihost.py n times on 127.0.0.1; -> (return codes, logs). Kills all on
  timeout or failure."""
  port = _free_port()
  env = _env(JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")  # listen on loopback only
  paths = [tmp_path / f"process{i}.log" for i in range(n)]
  procs = []
  try:
    for i, path in enumerate(paths):
      with open(path, "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, MULTIHOST, *args, f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={n}", f"--process_id={i}", "--initialization_timeout=120"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + TIMEOUT_S
    for p in procs:
      try:
        p.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"multi-process run exceeded {TIMEOUT_S}s:\n" + _tails(paths))
      if p.returncode != 0:  # a dead peer leaves the others waiting on collectives
        break
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], [path.read_text() for path in paths]


def _tails(paths):
  return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in paths)


def _params(workdir, step):
  """Params of the checkpoint at `step`, read onto one device whatever topology saved it."""
  d = os.path.join(workdir, "ckpt", str(step), "state")
  ckpt = ocp.StandardCheckpointer()
  meta = ckpt.metadata(d)
  meta = getattr(meta, "item_metadata", meta)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
  tree = ckpt.restore(d, abstract)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def _lines(workdir, name):
  return [json.loads(x) for x in open(os.path.join(workdir, name))]


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_dirs, tmp_path):
  if not socket.gethostbyname(socket.gethostname()).startswith("127."):
    pytest.skip("gloo would connect the processes through a non-loopback address")
  cfg = tmp_path / "cfg.py"
  cfg.write_text(f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
                 "from test_train import tiny_config\n"
                 "def get_config():\n"
                 f"  return tiny_config({str(tiny_dirs / 'teacher')!r}, **{OVERRIDES!r})\n")
  multi, one = tmp_path / "multi", tmp_path / "one"
  codes, logs = _run_processes([f"--config={cfg}", f"--workdir={multi}"], tmp_path)
  assert codes == [0, 0], _tails([tmp_path / "process0.log", tmp_path / "process1.log"])
  assert "process 0/2, 4 local of 8 devices" in logs[0]
  assert "process 1/2, 4 local of 8 devices" in logs[1]

  assert jax.device_count() == 8 and jax.process_count() == 1
  summary = train.run(tiny_config(tiny_dirs / "teacher", **OVERRIDES), str(one))
  assert summary["status"] == "done" and set(summary["sources"]) == {"dataset", "on_policy"}

  # the same steps were on-policy, and only process 0 wrote logs (one line per step)
  got, want = _lines(multi, "metrics.jsonl"), _lines(one, "metrics.jsonl")
  frac = lambda rows: [r["train/on_policy_fraction"] for r in rows if "train/loss" in r]
  assert frac(got) == frac(want) and len(frac(got)) == 4 and set(frac(got)) == {0.0, 1.0}
  assert len(os.listdir(multi / "tb")) == 1
  # losses here are ~2e-5 (a tiny random pair): all-reduce rounding (~2e-7) is a visible
  # fraction of them, hence the absolute floor (seen on an AMD EPYC: 1.93e-5 vs 1.91e-5)
  np.testing.assert_allclose([r["train/loss"] for r in got if "train/loss" in r],
                             [r["train/loss"] for r in want if "train/loss" in r], rtol=1e-4,
                             atol=1e-6)

  # The parameters match at every checkpoint, to float32 rounding rather than bit for bit:
  # gloo's cross-process all-reduce adds the 8 devices' partial sums in another order than
  # the in-process one (observed: max |diff| ~2e-7 after 4 steps). The tolerance is far
  # below what training moves them.
  tol = 1e-6
  for step in (2, 4):
    g, w = _params(multi, step), _params(one, step)
    assert g.keys() == w.keys() and len(w) > 10
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=tol, err_msg=f"step {step}: {k}")
  w2, w4 = _params(one, 2), _params(one, 4)
  assert max(np.abs(w4[k] - w2[k]).max() for k in w4) > 100 * tol

  # evaluation (replicated prompts) and the HF export (gathered params) agree too
  assert [s["student"] for s in _lines(multi, "samples_step4.jsonl")] == \
      [s["student"] for s in _lines(one, "samples_step4.jsonl")]
  ev = lambda rows: [r for r in rows if "eval/teacher_kl" in r][-1]["eval/teacher_kl"]
  np.testing.assert_allclose(ev(got), ev(want), rtol=0, atol=1e-6)  # KL ~1e-4 here
  hf_got, hf_want = (load_file(str(d / "hf" / "model.safetensors")) for d in (multi, one))
  assert hf_got.keys() == hf_want.keys()
  for k in hf_want:
    np.testing.assert_allclose(hf_got[k], hf_want[k], rtol=1e-5, atol=tol, err_msg=k)


@pytest.mark.parametrize("args,match", [
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2"],
     "--process_id / \\$JAX_PROCESS_ID not set"),
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     r"process_id=2 must be in \[0, num_processes=2\)"),
    (["--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=0"],
     "must be HOST:PORT"),
])
def test_multihost_rejects_bad_distributed_flags(tmp_path, args, match):
  proc = subprocess.run([sys.executable, MULTIHOST, f"--config={ROOT}/configs/demo.py",
                         f"--workdir={tmp_path / 'w'}", *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and re.search(match, proc.stderr + proc.stdout), proc.stderr
  assert not (tmp_path / "w").exists()  # nothing started


def test_multihost_without_distribution_is_one_process():
  """No coordinator given off a TPU VM: one process, jax.distributed not started."""
  code = ("import sys\n"
          f"sys.path.insert(0, {os.path.join(ROOT, 'launch')!r})\n"
          "import multihost\n"
          "multihost.FLAGS(['multihost.py', '--config=configs/demo.py', '--workdir=x'])\n"
          "if multihost.looks_like_tpu_vm(): print('TPU VM'); sys.exit(0)\n"
          "print(multihost.distributed_args(), multihost.initialize())\n")
  env = _env()
  for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE"):
    env.pop(k, None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  if proc.stdout.strip() == "TPU VM":
    pytest.skip("this machine looks like a Cloud TPU VM")
  assert proc.stdout.strip() == "None (0, 1)"
