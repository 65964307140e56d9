"""notebooks/*.ipynb: committed without outputs, and each runs top to bottom (GKD_NOTEBOOK_SMALL=1)
in a python3 kernel of this interpreter."""

import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb"))
SLOW = {"01_quickstart.ipynb"}  # trains SmolLM2 for a few steps
CELL_TIMEOUT_S = 300


def _run(nb, cwd):
  """Executes `nb` in place in a fresh python3 kernel: CPU JAX, one device (as on Colab's CPU)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(GKD_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             TMPDIR=str(cwd))  # the notebook's tempfile workdirs go with pytest's tmp_path
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}})
  client.execute(env=env)
  return nb


def _text(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebooks_exist():
  assert {"01_quickstart.ipynb", "02_divergence_explorer.ipynb",
          "03_smollm2_sample_and_score.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code), \
      f"{name}: clear the outputs before committing"
  assert "widgets" not in nb.metadata
  first = code[0].source
  assert "import gkd_jax" in first and "except ImportError" in first and "pip install" in first, \
      f"{name}: the first code cell must install gkd_jax only when it is not importable"


def test_kernel_is_this_interpreter(tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells.append(nbformat.v4.new_code_cell("import sys, jax; print(sys.executable); "
                                            "print(jax.device_count())"))
  out = _text(_run(nb, tmp_path).cells[0]).split()
  assert out == [sys.executable, "1"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(name, tmp_path):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  _run(nb, tmp_path)  # raises CellExecutionError naming the failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{name} drew no figure"
  text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  if name.startswith("01"):
    assert "done after 3 steps" in text and "student after" in text
  elif name.startswith("02"):
    err = float(text.split("max |FKL - (TKD + u*DKD)| =")[1].split()[0])
    assert err < 1e-4
    fits = {line.split()[0]: line for line in text.splitlines() if "mu=" in line}
    mu = lambda name: float(fits[name].split("mu=")[1].split()[0])
    assert abs(mu("FKL") - 48.5) < 3 and abs(mu("RKL") - 35) < 1  # covering vs seeking
    lower = {float(line.split()[0]): line.split()[-1] for line in text.splitlines()
             if line.endswith(("covering", "seeking"))}
    assert lower[0.1] == "covering" and lower[0.9] == "seeking"
  else:
    assert "greedy: The capital of France is Paris." in text
    ppl = {line.split("'")[1]: float(line.split()[1]) for line in text.splitlines()
           if line.startswith("perplexity")}
    assert ppl["The capital of France is Paris."] < ppl["The capital of France is Berlin."] \
        < ppl["France capital the Paris is of."]
