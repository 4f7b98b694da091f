"""``/v1/jobs/{id}/plots/{name}.png``: training curves for every job, and the plots the job's model
family offers (``Family.plots``; density and samples for 2-D flows), drawn by ``service/plots.py``."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service import plots
from jobs.artifacts import UPLOAD_SUFFIXES, ArtifactStore, dataset_key, latest_checkpoint, plot_key
from jobs.status import TERMINAL
from jobs.tables import Job
from service.deps import ArtifactsDep, JobDep, ModelsDep, StoreDep
from service.errors import ProblemError
from service.routers.inference import RESPONSES, load_job_model

router = APIRouter(prefix="/jobs", tags=["plots"])


def _plot_data(name: str, job: Job, artifacts: ArtifactStore):
    dataset = job.spec["dataset"]
    if dataset["name"] not in UPLOAD_SUFFIXES:
        return plots.plot_data(name, job.spec)
    with artifacts.local_path(dataset_key(dataset["id"], dataset["name"])) as path:
        return plots.plot_data(name, job.spec, str(path))


@router.get("/{job_id}/plots/{name}.png", responses={**RESPONSES, 200: {"content": {"image/png": {}}}},
            response_class=Response)
def plot(job: JobDep, name: str, store: StoreDep, models: ModelsDep, artifacts: ArtifactsDep) -> Response:
    """PNG figure ``training`` (loss, test metric, NFE forward/backward against step), or a plot of the
    job's model family: for 2-D density/energy jobs ``density`` (exp log p heat map with training
    points) and ``samples``; for time-series jobs ``trajectories`` and, for 2-D ``node`` models,
    ``vector_field`` (the learned field's streamlines beside the true one of a built-in generator).
    409 ``not-2d`` when the model cannot have the plot (another dimension, an augmented ``node``).

    A figure of the model is drawn once per checkpoint and kept (the job's newest checkpoint names
    it); a finished job's training figure is kept too. A job with no metric row yet gets a figure
    saying "no data yet"."""
    if name not in plots.PLOTS:
        raise ProblemError(404, "plot-not-found", f"no plot {name!r}; available: {', '.join(plots.PLOTS)}")
    title = f"job {job.id[:8]}: {job.model_type} on {job.spec['dataset']['name']}"
    if name == "training":
        from node_engine.families import family_for_spec

        key = plot_key(job.id, plots.cache_name(name, "final")) if job.status in TERMINAL else None
        png = _cached(artifacts, key)
        if png is None:
            family = family_for_spec(job.spec)
            history, _ = store.metrics_history(job, after_step=-1, limit=1_000_000)
            png = plots.training_png(history, title, family.train_metrics, family.eval_metrics)
            _keep(artifacts, key, png)
    else:
        newest = latest_checkpoint(artifacts, job.id)
        png = _cached(artifacts, plot_key(job.id, plots.cache_name(name, newest)) if newest else None)
        if png is None:
            entry = load_job_model(job, models, name, f"plot {name!r}")
            reason = plots.unavailable(name, entry.model)
            if reason is not None:
                raise ProblemError(409, "not-2d", reason)
            data = _plot_data(name, job, artifacts)
            with entry.lock:
                png = plots.MODEL_PLOTS[name](entry.model, data, title)
            _keep(artifacts, plot_key(job.id, plots.cache_name(name, entry.checkpoint)), png)
    return Response(png, media_type="image/png")


def _cached(artifacts: ArtifactStore, key: str | None) -> bytes | None:
    if key is None:
        return None
    try:
        return artifacts.get(key)
    except FileNotFoundError:
        return None


def _keep(artifacts: ArtifactStore, key: str | None, png: bytes) -> None:
    if key is not None:
        artifacts.put(key, png)  # atomic: a concurrent reader sees the whole figure or none
