"""``from node_engine import load_model`` with a checkpoint file's path or its bytes (issue 15), and
the README's "Use a checkpoint offline from Python" snippet run as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

import node_engine
from node_engine.training import TrainingCallbacks, build_trainer

README = Path(__file__).resolve().parents[2] / "README.md"


class Keep(TrainingCallbacks):
    def __init__(self) -> None:
        self.checkpoints: dict[str, bytes] = {}

    def on_checkpoint(self, name: str, data: bytes) -> None:
        self.checkpoints[name] = data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    keep = Keep()
    build_trainer({"model": {"type": "planar", "num_layers": 2}, "dataset": {"name": "moons", "n_samples": 300},
                   "training": {"iterations": 5, "batch_size": 64, "lr": 1e-2, "eval_every": 5,
                                "checkpoint_every": 5}}).run(keep)
    path = tmp_path_factory.mktemp("ckpt") / "final.safetensors"
    path.write_bytes(keep.checkpoints["final.safetensors"])
    return path


def test_load_model_from_a_path_or_bytes(checkpoint):
    from node_engine import load_model

    points = np.array([[0.0, 0.5], [1.0, -0.5], [3.0, 3.0]])
    by_str, by_path, by_bytes = (load_model(src) for src in (str(checkpoint), checkpoint, checkpoint.read_bytes()))
    answers = [m.log_density(points)[0] for m in (by_str, by_path, by_bytes)]
    np.testing.assert_array_equal(answers[0], answers[1])
    np.testing.assert_array_equal(answers[0], answers[2])
    # a normalized density: exp(log p) integrates to 1 over the plane (Riemann sum on a grid)
    grid = np.linspace(-8, 8, 241)
    xx, yy = np.meshgrid(grid, grid)
    log_p, _ = by_path.log_density(np.stack([xx.ravel(), yy.ravel()], 1))
    assert np.exp(log_p).sum() * (grid[1] - grid[0]) ** 2 == pytest.approx(1.0, abs=0.02)
    with pytest.raises(FileNotFoundError):
        load_model(checkpoint.with_name("absent.safetensors"))
    assert "load_model" in node_engine.__all__


def test_readme_offline_snippet_runs(checkpoint, monkeypatch):
    text = README.read_text()
    section = text.split("### Use a checkpoint offline from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(checkpoint.parent)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert scope["x"].shape == (1000, 2) and math.isfinite(float(scope["log_p"][0])) and scope["nfe"] == 0
