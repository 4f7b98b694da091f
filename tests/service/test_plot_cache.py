"""Figures (issue 15): a model's figure is drawn once per checkpoint and then served from the
artifact store; a finished job's training figure too; a job without metric rows gets a "no data
yet" figure, not empty axes. The figures are read back as images (matplotlib's PNG reader)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import LocalArtifactStore, plots_prefix
from jobs.settings import Settings
from jobs.store import JobStore
from service import plots
from service.app import create_app
from worker.runner import WorkerContext, run_job

FLOW = {"model": {"type": "planar", "num_layers": 2}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 2, "batch_size": 64, "eval_every": 2, "checkpoint_every": 2}}


@pytest.fixture
def setup(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", broker_url="memory://",
                        artifact_dir=tmp_path / "artifacts", device="cpu")
    with TestClient(create_app(settings)) as client:
        yield client, settings


def longest_dark_run(png: bytes) -> int:
    """The longest horizontal run of dark pixels (luminance < 0.2): axes spines are long dark lines,
    text is not."""
    from matplotlib.image import imread

    img = imread(io.BytesIO(png))[..., :3].mean(axis=2)
    best = 0
    for row in img < 0.2:
        edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if len(starts):
            best = max(best, int((ends - starts).max()))
    return best


def test_no_data_figure_then_curves_and_figures_cached_per_checkpoint(setup):
    client, settings = setup
    job_id = client.post("/v1/jobs", json=FLOW).json()["id"]
    empty = client.get(f"/v1/jobs/{job_id}/plots/training.png")
    assert empty.status_code == 200 and empty.headers["content-type"] == "image/png"
    assert longest_dark_run(empty.content) < 50  # no axes drawn
    assert client.get(f"/v1/jobs/{job_id}/plots/density.png").status_code == 409  # no checkpoint yet

    store = JobStore.from_settings(settings)
    assert run_job(job_id, WorkerContext(settings, store, LocalArtifactStore(settings.artifact_dir))) == "succeeded"
    curves = client.get(f"/v1/jobs/{job_id}/plots/training.png").content
    assert longest_dark_run(curves) > 150  # axes

    cache = settings.artifact_dir / plots_prefix(job_id)
    first = client.get(f"/v1/jobs/{job_id}/plots/density.png")
    assert first.status_code == 200
    cached = sorted(p.name for p in cache.iterdir())
    assert cached == [f"density-final-v{plots.PLOT_VERSION}.png", f"training-final-v{plots.PLOT_VERSION}.png"]
    assert (cache / f"density-final-v{plots.PLOT_VERSION}.png").read_bytes() == first.content
    # The second request is served from the cache, not redrawn: it returns what the cache holds.
    (cache / f"density-final-v{plots.PLOT_VERSION}.png").write_bytes(b"\x89PNG cached")
    (cache / f"training-final-v{plots.PLOT_VERSION}.png").write_bytes(b"\x89PNG cached curves")
    assert client.get(f"/v1/jobs/{job_id}/plots/density.png").content == b"\x89PNG cached"
    assert client.get(f"/v1/jobs/{job_id}/plots/training.png").content == b"\x89PNG cached curves"
    # samples is another figure: drawn on its first request
    assert client.get(f"/v1/jobs/{job_id}/plots/samples.png").content[:4] == b"\x89PNG"
    assert (cache / f"samples-final-v{plots.PLOT_VERSION}.png").exists()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert not cache.exists() or list(cache.iterdir()) == []
