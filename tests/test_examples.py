"""The README's Python example, run exactly as printed, and smoke-sized runs of examples/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from trainable.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.py"

pytestmark = pytest.mark.slow


def readme_python_example() -> str:
    """The README's one ```python block that runs a search."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (example,) = [b for b in blocks if "hptune.search(" in b]
    return example


def test_the_readme_python_example_is_examples_quickstart_and_15_lines_or_fewer():
    example = readme_python_example()
    assert example == QUICKSTART.read_text()
    assert len(example.splitlines()) <= 15


def test_the_readme_python_example_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(readme_python_example())
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "quickstart" / "trials.csv")
    assert len(table) == 8 and set(table["status"]) <= {"finished", "early-stopped", "stalled"}
    assert "model_args" in run.stdout and "test_accuracy" in run.stdout  # the printed best config and table
    best = table[table["rank"] == 1].iloc[0]
    config = TrainConfig.load(tmp_path / "results" / "quickstart" / "best_config.yaml")
    assert config.model_args == {"width": int(best["model.width"])} and config.lr == pytest.approx(best["lr"])
    assert (config.model, config.data) == ("quickstart.py:model", "quickstart.py:data")
    # best_config.yaml names the model and data by the script's path, so it re-trains without the search
    retrain = subprocess.run([sys.executable, "-m", "trainable", "--config", "results/quickstart/best_config.yaml",
                              "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert retrain.returncode == 0, retrain.stderr


@pytest.mark.parametrize("model, data, space", [
    ("examples/ray_tutorial_cnn.py:net", "synthetic", "examples/ray_tutorial_space.yaml"),
    ("examples/ray_tutorial_cnn.py:net", "synthetic", "examples/ray_tutorial_cnn_space.yaml"),
    ("examples/tabular.py:model", "examples/tabular.py:data", "examples/tabular_space.yaml"),
], ids=["cnn-tutorial-space", "cnn-our-space", "tabular"])
@pytest.mark.heavy  # three searches in processes of their own: the README's example runs in the default run
def test_each_example_runs_as_a_smoke_test(tmp_path, model, data, space):
    run = subprocess.run([sys.executable, "tuning/search.py", "--smoke-test", "--model", model, "--data", data,
                          "--space", space, "--num-cpus", "2", "--results-dir", str(tmp_path), "--name", "smoke"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "smoke" / "trials.csv")
    assert len(table) == 3 and (table["epochs"] == 2).all()
    assert any(c.startswith("model.") for c in table.columns)
