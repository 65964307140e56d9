"""gkd_jax.observe: metrics.jsonl round trip (NaN -> null, cut-short lines), TensorBoard events read
back by TensorBoard's own EventAccumulator, the PNG plot, the disabled logger, and Progress."""
import io
import json
import math
import os
import subprocess
import sys
import time

import pytest

from gkd_jax import observe


def test_jsonl_round_trip_with_non_finite(tmp_path):
    with observe.MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.write(1, {"loss": 2.5, "lr": 1e-3})
        log.write(2, {"loss": float("nan"), "grad_norm": float("inf")})
        log.write(2, {"rougeL": 31.0}, prefix="eval")
    assert observe.read_metrics(str(tmp_path)) == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"step": 2, "train/loss": None, "train/grad_norm": None},
        {"step": 2, "eval/rougeL": 31.0},
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "train/loss": None, "train/grad_norm": None}  # strict JSON
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]


def test_numpy_scalars_and_bad_values(tmp_path):
    np = pytest.importorskip("numpy")
    with observe.MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.write(np.int64(3), {"loss": np.float32(0.5), "n": np.array(7)})
        with pytest.raises(ValueError, match="metric 'name' is not a number"):
            log.write(4, {"name": "abc"})
    assert observe.read_metrics(str(tmp_path)) == [{"step": 3, "train/loss": 0.5, "train/n": 7.0}]


def test_truncated_last_line_and_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/lo')  # killed mid-write
    assert observe.read_metrics(str(tmp_path)) == [{"step": 1, "train/loss": 3.0}]
    with observe.MetricsLogger(str(tmp_path), tensorboard=False) as log:  # the resumed run appends
        log.write(2, {"loss": 2.0})
    with pytest.warns(UserWarning, match=r"skipped unparseable lines \[2\]"):
        rows = observe.read_metrics(str(tmp_path))
    assert rows == [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}]


READ_TB = r"""
import json, sys, types
# read with TensorBoard's TF-free stub even though TensorFlow is installed
sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
from tensorboard.backend.event_processing import event_accumulator
acc = event_accumulator.EventAccumulator(sys.argv[1])
acc.Reload()
out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
assert "tensorflow" not in sys.modules
print(json.dumps(out))
"""


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    with observe.MetricsLogger(str(tmp_path)) as log:
        log.write(10, {"loss": 1.5, "lr": 0.25})
        log.write(20, {"loss": 0.75})
        log.write(20, {"accuracy": 12.5}, prefix="eval")
    files = os.listdir(tmp_path / "tb")
    assert len(files) == 1 and "tfevents" in files[0]
    out = subprocess.run([sys.executable, "-c", READ_TB, str(tmp_path / "tb")], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == {"train/loss": [[10, 1.5], [20, 0.75]], "train/lr": [[10, 0.25]],
                               "eval/accuracy": [[20, 12.5]]}


def test_disabled_logger_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    log = observe.MetricsLogger(str(workdir), enabled=False)
    log.write(1, {"loss": 1.0})
    log.close()
    assert not workdir.exists()


def test_plot_writes_png(tmp_path):
    with observe.MetricsLogger(str(tmp_path), tensorboard=False) as log:
        for step in range(1, 8):
            log.write(step, {"loss": 1.0 / step, "kd_loss": 0.5 / step, "lr": 0.1})
        log.write(4, {"rougeL": 20.0, "loss": float("nan")}, prefix="eval")
        log.write(7, {"rougeL": 25.0, "loss": 1.0}, prefix="eval")
    path = observe.plot(str(tmp_path))
    assert path == str(tmp_path / "curves.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    other = observe.plot(str(tmp_path), out_png=str(tmp_path / "x.png"))
    assert other.endswith("x.png") and os.path.getsize(other) > 1000


def test_curves_keep_last_value_of_repeated_steps():
    rows = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0},
            {"step": 2, "train/loss": 2.5}, {"step": 3, "train/loss": None}, {"step": 1, "eval/acc": 5}]
    assert observe._curves(rows) == {"train/loss": ([1, 2], [3.0, 2.5]), "eval/acc": ([1], [5])}


def test_plot_without_curves_is_an_error(tmp_path):
    with observe.MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.write(1, {"lr": 0.1})
    with pytest.raises(ValueError, match="no train/\\*loss\\* or eval/\\* values"):
        observe.plot(str(tmp_path))


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_progress_shows_step_loss_rate_and_eta(use_tqdm):
    out = io.StringIO()
    p = observe.Progress(20, start_step=4, file=out, use_tqdm=use_tqdm)
    p.update(4, loss=2.0)
    p._t0 = time.monotonic() - 10.0  # 10 s for steps 4 -> 8: 12 steps left take 30 s
    p.update(8, loss=1.23456, tokens_per_s=12345.0)
    p.close()
    text = out.getvalue()
    assert "eta=?" in text  # nothing done yet at the first update
    assert "loss=0.0001234" in p.describe(9, loss=0.00012345)
    assert "8/20" in text and "loss=1.235" in text and "tok/s=12.3k" in text and "eta=0:00:30" in text


def test_progress_disabled_and_bad_args():
    out = io.StringIO()
    p = observe.Progress(5, enabled=False, file=out)
    p.update(1, loss=1.0)
    p.close()
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="start_step=6"):
        observe.Progress(5, start_step=6)


def test_hms():
    assert observe._hms(0) == "0:00:00" and observe._hms(3725.4) == "1:02:05"
    assert math.isclose(float(observe._si(999)), 999.0) and observe._si(2.5e6) == "2.5M"


def test_import_is_light():
    code = ("import sys, gkd_jax.observe; "
            "bad = [m for m in ('tensorflow', 'torch', 'seqio', 'matplotlib', 'tensorboard') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
