"""Multi-host entry point: ``jax.distributed.initialize()``, then the ``gkd_jax.main`` CLI.

Run the SAME command on every host (process) of a job:

    python launch/multihost.py --config=configs/NAME.py --workdir=gs://bucket/run \\
        [--config.a.b=v] [--gin_bindings='a.b = v']        # every gkd_jax.main flag works

How the processes find each other (``--distributed``, default ``auto``):

* explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
  env vars ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
  HOST:PORT is process 0's address and a free port on it. Used for CPU/GPU clusters and
  for the two-process test on 127.0.0.1 (tests/test_multihost.py). The coordinator listens
  on all interfaces unless ``JAX_COORDINATOR_BIND_ADDRESS`` (e.g. 127.0.0.1:PORT) says otherwise.
* Cloud TPU VM pod slices: nothing to pass; ``jax.distributed.initialize()`` reads the
  worker list from the TPU metadata (``auto`` does this when the machine looks like a TPU
  VM; ``--distributed=on`` forces it, e.g. for SLURM / Open MPI auto-detection).
* ``--distributed=off``, or ``auto`` with none of the above: one process, like
  ``python -m gkd_jax.main``.

On CPU, cross-process collectives use gloo (set here explicitly; it is jax's default).
Give each CPU process several devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.

What a multi-process run does (gkd_jax/train.py):

* one device mesh spans every process (``config.mesh``; ``data=-1`` takes all devices);
* data: ``config.data.batch_size`` is the GLOBAL batch. Process p reads its own rows of
  each global batch (``get_dataset(shard_index=jax.process_index(),
  num_shards=jax.process_count())``, ``batch_size // process_count`` rows each), and
  ``sharding.shard_batch`` assembles them into one global array with
  ``jax.make_array_from_process_local_data``. The global batch of step k is the same
  for any number of processes, so N processes train exactly what one process would;
* which step is on-policy and every sampling key are functions of (seed, step): all
  processes agree without communicating;
* only process 0 writes ``config.json``, ``metrics.jsonl`` / TensorBoard events,
  ``samples_step*.jsonl``, ``curves.png`` and the Hugging Face export (``hf/``; every
  process joins the gather of the parameters it exports);
* all processes take part in checkpointing: orbax writes each process's shards and
  process 0 the metadata, so ``--workdir`` must be one directory every host sees (NFS /
  Filestore, or a gcsfuse mount; the trainer writes through local file APIs, so gs:// URLs
  are not accepted). Resuming works as for one process;
* evaluation runs on every process: the eval prompts are replicated (every process holds
  the whole batch), so each can read the decoded text; process 0 logs the results.
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # running from a checkout without `pip install -e .`
  sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from gkd_jax import main as gkd_main  # noqa: E402  (defines --config, --workdir, --gin_*)

flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): auto = when a coordinator address is "
                  "given or on a Cloud TPU VM; on = always (auto-detect unset values); off = never.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) "
                     "(default: $JAX_PROCESS_ID).")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Seconds to wait for every process to reach the coordinator.")
FLAGS = flags.FLAGS


def _int_env(name):
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(f"${name}={value!r} is not an integer") from None


def looks_like_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU env vars set by the runtime, or TPU device files."""
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"):
    return True
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def distributed_args():
  """-> kwargs for jax.distributed.initialize, or None to stay single-process.

  Raises app.UsageError naming the missing or bad value.
  """
  address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  n = FLAGS.num_processes if FLAGS.num_processes is not None else _int_env("JAX_NUM_PROCESSES")
  pid = FLAGS.process_id if FLAGS.process_id is not None else _int_env("JAX_PROCESS_ID")
  if FLAGS.distributed == "off":
    return None
  if address is None and n is None and pid is None:
    if FLAGS.distributed == "on" or looks_like_tpu_vm():
      return {}  # jax auto-detects (Cloud TPU, SLURM, Open MPI)
    return None
  missing = [name for name, v in (("--coordinator_address / $JAX_COORDINATOR_ADDRESS", address),
                                  ("--num_processes / $JAX_NUM_PROCESSES", n),
                                  ("--process_id / $JAX_PROCESS_ID", pid)) if v is None]
  if missing:
    raise app.UsageError(f"multi-process run: {', '.join(missing)} not set (give all three, "
                         "or none on a Cloud TPU VM)")
  if ":" not in address:
    raise app.UsageError(f"coordinator address {address!r} must be HOST:PORT")
  if n < 1 or not 0 <= pid < n:
    raise app.UsageError(f"process_id={pid} must be in [0, num_processes={n})")
  return dict(coordinator_address=address, num_processes=n, process_id=pid)


def initialize():
  """Starts jax.distributed if this run is multi-process; returns (process_index, count)."""
  import jax
  kwargs = distributed_args()
  if kwargs is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(initialization_timeout=FLAGS.initialization_timeout, **kwargs)
  return jax.process_index(), jax.process_count()


def main(argv):
  index, count = initialize()
  if count > 1:
    import jax
    print(f"gkd_jax multihost: process {index}/{count}, {jax.local_device_count()} local of "
          f"{jax.device_count()} devices", flush=True)
  return gkd_main.main(argv)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
