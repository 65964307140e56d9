"""Observability for the training loop: metrics files, TensorBoard scalars, curves, progress line.

  MetricsLogger(workdir)   write(step, {"loss": ...}, prefix="train") -> workdir/metrics.jsonl
                           (one JSON object a line, non-finite -> null) + TensorBoard events in
                           workdir/tb/; enabled=False (non-zero hosts) makes it a no-op
  read_metrics(workdir)    the rows back (a line cut short by a killed run is skipped)
  plot(workdir)            workdir/curves.png: training losses and each "eval/" metric vs step
  Progress(total_steps)    one-line step/total, loss, tokens/s and ETA (tqdm if installed)

The workdir may be a URL (gs://bucket/run; files go through `gkd_jax.files`, i.e. etils.epath). An
object store cannot append: there metrics.jsonl and the events file are kept in memory and each
write uploads the whole file again (one atomic object write), so what is in the bucket is always
a whole file up to the last row written. Locally both are appended to.

Light to import: standard library only. TensorBoard events are written with `tensorboard`'s
record framing and protos (no TensorFlow); matplotlib loads inside `plot`.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import socket
import sys
import time
import warnings

from gkd_jax import files

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_FILE_IDS = itertools.count()


class _WholeObject:
  """A write-only file for an object store: kept in memory, each ``flush`` writes it whole."""

  def __init__(self, path, data: bytes = b""):
    self.path, self._data, self.closed = path, bytearray(data), False

  def write(self, data) -> None:
    self._data += data.encode("utf-8") if isinstance(data, str) else data

  def tell(self) -> int:
    return len(self._data)

  def flush(self) -> None:
    files.path(self.path).write_bytes(bytes(self._data))

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


def _open_append(path, binary: bool = False):
  """``path`` opened to append: locally a file; on an object store a ``_WholeObject`` holding
  what is there now."""
  if files.is_local(path):
    return files.path(path).open("ab") if binary else files.path(path).open("a", encoding="utf-8")
  p = files.path(path)
  return _WholeObject(path, p.read_bytes() if p.exists() else b"")


class _EventWriter:
  """Scalar TensorBoard events, written without TensorFlow (TFRecord-framed `Event` protos)."""

  def __init__(self, logdir: str):
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as e:
      raise ImportError(
        "MetricsLogger(tensorboard=True) needs the `tensorboard` package "
        "(pip install tensorboard) or pass tensorboard=False"
      ) from e
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    files.path(logdir).mkdir(parents=True, exist_ok=True)
    name = (
      f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
      f".{os.getpid()}.{next(_FILE_IDS)}"
    )
    self.path = os.path.join(logdir, name)
    self._records = RecordWriter(_open_append(self.path, binary=True))
    self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    self._records.write(event.SerializeToString())
    self._records.flush()

  def scalars(self, step: int, values: dict[str, float]):
    summary = self._summary(
      value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()]
    )
    self._write(self._event(wall_time=time.time(), step=step, summary=summary))

  def close(self):
    if not self._records.closed:
      self._records.close()


class MetricsLogger:
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard events under ``workdir/tb/``
  (on gs:// each write rewrites the file whole: see the module docstring)."""

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    tensorboard: bool = True,
    keep_until: int | None = None,
  ):
    """keep_until: a resumed run's start step; rows an interrupted sitting logged after it
    (they are logged again) are dropped first. -1 drops every row (a run starting over)."""
    self.workdir, self.enabled = workdir, enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = self._tb = None
    if not enabled:
      return
    files.path(workdir).mkdir(parents=True, exist_ok=True)
    if keep_until is not None and files.path(self.path).is_file():
      kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= keep_until]
      files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self._file = _open_append(self.path)
    if self._file.tell() > 0 and _last_byte(self.path) != b"\n":
      self._file.write("\n")  # resuming: end a line a killed run left cut short
    if tensorboard:
      self._tb = _EventWriter(os.path.join(workdir, TB_DIR))

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    """One JSON line ``{"step": step, "prefix/key": value, ...}`` and one TensorBoard scalar per key."""
    if not self.enabled:
      return
    values = {}
    for key, value in metrics.items():
      try:
        values[f"{prefix}/{key}" if prefix else key] = float(value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r} is not a number: {value!r}") from e
    row = {"step": int(step), **{k: v if math.isfinite(v) else None for k, v in values.items()}}
    try:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
      if self._tb is not None:
        self._tb.scalars(int(step), values)
    except OSError as e:  # e.g. a full disk: say which file
      raise OSError(e.errno, f"{e.strerror}: could not write metrics to {self.workdir}") from e

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _last_byte(path) -> bytes:
  with files.path(path).open("rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` in file order; lines that do not parse are skipped."""
  rows, bad = [], []
  lines = files.read_text(os.path.join(workdir, METRICS_FILE)).split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      bad.append(i + 1)
  if bad and bad != [len(lines)]:  # a cut-short last line is expected after a kill; others are not
    warnings.warn(f"{workdir}/{METRICS_FILE}: skipped unparseable lines {bad}")
  return rows


def _curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """key -> (steps, values), sorted by step; a step logged twice (resumed run) keeps its last value."""
  by_key: dict[str, dict[int, float]] = {}
  for row in rows:
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        by_key.setdefault(key, {})[row["step"]] = value
  return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}


def plot(workdir: str, out_png: str | None = None) -> str:
  """PNG of the training loss curve(s) (``train/*loss*``) and one subplot per ``eval/`` metric."""
  curves = _curves(read_metrics(workdir))
  groups = {}
  losses = sorted(k for k in curves if k.startswith("train/") and "loss" in k)
  if losses:
    groups["train loss"] = losses
  for key in sorted(k for k in curves if k.startswith("eval/")):
    groups[key] = [key]
  if not groups:
    raise ValueError(f"{workdir}/{METRICS_FILE} has no train/*loss* or eval/* values to plot")

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ncols = min(3, len(groups))
  nrows = -(-len(groups) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.5 * nrows), squeeze=False)
  for ax, (title, keys) in zip(axes.flat, groups.items()):
    for key in keys:
      steps, values = curves[key]
      ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    ax.set_title(keys[0] if len(keys) == 1 else title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize="small")
  for ax in list(axes.flat)[len(groups) :]:
    ax.axis("off")
  fig.tight_layout()
  out_png = out_png or os.path.join(workdir, "curves.png")
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(out_png)[1][1:] or "png", dpi=100)
  plt.close(fig)
  files.write_bytes(out_png, buf.getvalue())
  return out_png


def _hms(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _si(x: float) -> str:
  for unit, scale in (("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.1f}"


class Progress:
  """One-line progress: ``step/total loss tok/s eta`` (tqdm bar if installed, else printed lines).

  ETA = remaining steps / mean step rate since construction (so a resumed run's `start_step`
  does not count as done work).
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    enabled: bool = True,
    *,
    file=None,
    use_tqdm: bool | None = None,
  ):
    if total_steps < 1 or not 0 <= start_step <= total_steps:
      raise ValueError(
        f"need total_steps >= 1 and 0 <= start_step <= total_steps, "
        f"got total_steps={total_steps}, start_step={start_step}"
      )
    self.total, self.start, self.enabled = total_steps, start_step, enabled
    self.file = file if file is not None else sys.stderr
    self._t0 = time.monotonic()
    self._bar = None
    if not enabled:
      return
    if use_tqdm is None:
      try:
        import tqdm  # noqa: F401

        use_tqdm = True
      except ImportError:
        use_tqdm = False
    if use_tqdm:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total_steps,
        initial=start_step,
        file=self.file,
        dynamic_ncols=True,
        bar_format="{n_fmt}/{total_fmt} |{bar}| {desc}",
      )

  def describe(
    self, step: int, loss: float | None = None, tokens_per_s: float | None = None
  ) -> str:
    """The status text: ``loss=... tok/s=... eta=h:mm:ss`` (eta "?" before any step is done)."""
    parts = []
    if loss is not None:
      parts.append(f"loss={loss:.4g}")  # 4 significant digits: tiny losses stay visible
    if tokens_per_s is not None:
      parts.append(f"tok/s={_si(tokens_per_s)}")
    done, elapsed = step - self.start, time.monotonic() - self._t0
    eta = _hms((self.total - step) * elapsed / done) if done > 0 else "?"
    parts.append(f"eta={eta}")
    return " ".join(parts)

  def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
    if not self.enabled:
      return
    text = self.describe(
      step,
      None if loss is None else float(loss),
      None if tokens_per_s is None else float(tokens_per_s),
    )
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_description_str(text, refresh=False)
      self._bar.refresh()
    else:
      print(f"step {step}/{self.total} {text}", file=self.file, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
