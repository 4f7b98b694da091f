"""PNG figures of a job, drawn headless with matplotlib's Agg canvas (no pyplot state: thread-safe).

- ``training``: loss, the test metric and NFE (forward and backward) against the training step — the
  "NFE over training" figure of Chen et al. 2018 (Fig. 3d) / Grathwohl et al. 2019.
- ``density``: heat map of p(x) = exp(log p(x)) on a grid over the data, training points on top (2-D).
- ``samples``: samples of the model next to training points (2-D).
- ``trajectories``: a few test series, observed points vs the model's fit from each series' first
  observation over its context (solid) and its extrapolation beyond (dashed), one panel per series.
- ``vector_field``: for 2-D ``node`` models, the learned field dy/dt in the data's units as
  streamlines coloured by speed, the test series on top, and beside it the true field of a
  built-in generator with known dynamics (``node_engine.families.vector_field``).

Which model plots a job offers is its family's ``plots`` (``node_engine.families``); this module
only draws them (``MODEL_PLOTS``) from what the served model offers (``log_density``, ``sample``).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure



def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def training_png(history: Sequence[dict[str, Any]], title: str, train_metrics: Sequence[str],
                 eval_metrics: Sequence[str]) -> bytes:
    """Loss / the family's metrics / NFE against step from the job's metric rows.

    ``train_metrics``, ``eval_metrics``: the model family's metric names (``Family.train_metrics``,
    ``Family.eval_metrics``); the first training metric is drawn next to the evaluation metrics.
    """
    if not history:
        return no_data_png(title, "no data yet: the job has not logged a training step")
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    axes[0].plot(*series("loss"), lw=1)
    axes[0].set(xlabel="step", ylabel="training loss", title="loss")
    for key in list(train_metrics)[:1]:  # e.g. the training batch's NLL in data coordinates, next to test_nll
        xs, ys = series(key)
        if xs:
            axes[1].plot(xs, ys, lw=0.8, alpha=0.5, label=f"train {key}")
    for key in eval_metrics:
        xs, ys = series(key)
        if xs:
            axes[1].plot(xs, ys, marker="o", ms=3, label=key)
    axes[1].set(xlabel="step", title="test metric")
    if axes[1].has_data():
        axes[1].legend()
    for key, label in (("nfe_forward", "NFE forward"), ("nfe_backward", "NFE backward")):
        xs, ys = series(key)
        if xs:
            axes[2].plot(xs, ys, lw=1, label=label)
    axes[2].set(xlabel="step", ylabel="function evaluations", title="NFE over training")
    if axes[2].has_data():
        axes[2].legend()
    fig.suptitle(title)
    return _png(fig)


def no_data_png(title: str, message: str) -> bytes:
    """A figure that says ``message`` (no axes: empty axes would read as a flat or broken curve)."""
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="0.35")
    fig.suptitle(title)
    return _png(fig)


# ---- cache: a figure is drawn once per checkpoint --------------------------------------------------
#: bumped when a figure's drawing changes, so figures cached by an older release are not served
PLOT_VERSION = 3


def cache_name(plot: str, checkpoint: str) -> str:
    """File name of the cached figure ``plot`` drawn from checkpoint ``checkpoint`` ("final" for a
    finished job's training curves): ``density-final-v1.png``. Figures are cached in the artifact
    store (``jobs.artifacts.plot_key``: shared by every API replica, removed with the job); a
    checkpoint is never rewritten with other weights, and a finished job's metric rows no longer change."""
    stem = checkpoint.removesuffix(".safetensors")
    return f"{plot}-{stem}-v{PLOT_VERSION}.png"


def _bounds(points: np.ndarray | None, fallback: np.ndarray) -> tuple[float, float, float, float]:
    ref = points if points is not None and len(points) else fallback
    lo, hi = np.percentile(ref, 0.5, axis=0), np.percentile(ref, 99.5, axis=0)
    pad = 0.25 * (hi - lo) + 1e-3
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


def density_png(model: Any, train_points: np.ndarray | None, title: str, resolution: int = 80) -> bytes:
    """Heat map of exp(log p) over the data's range. ``model``: a 2-D node_engine DensityModel."""
    x0, x1, y0, y1 = _bounds(train_points, model.sample(2000, 0))
    xs, ys = np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution)
    gx, gy = np.meshgrid(xs, ys)
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    logp, _ = model.log_density(grid)
    fig = Figure(figsize=(6.3, 5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.exp(logp).reshape(resolution, resolution), origin="lower", extent=(x0, x1, y0, y1),
                      cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="p(x)  (per unit area of the data's units)")
    if train_points is not None:
        pts = train_points[:2000]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, c="white", alpha=0.35)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), title=title, xlabel="$x_1$", ylabel="$x_2$")  # points past it: clipped
    return _png(fig)


def samples_png(model: Any, train_points: np.ndarray | None, title: str, n: int = 2000) -> bytes:
    """Model samples (orange) beside training points (grey)."""
    samples = model.sample(n, 0)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    if train_points is not None:
        pts = train_points[:n]
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="0.6", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:orange", label="samples")
    x0, x1, y0, y1 = _bounds(train_points, samples)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), title=title, xlabel="$x_1$", ylabel="$x_2$")
    ax.legend(loc="upper right", markerscale=4)
    return _png(fig)


def trajectories_png(model: Any, data: Any, title: str, n_series: int = 3, resolution: int = 200) -> bytes:
    """Observed vs fitted vs extrapolated trajectories of the first ``n_series`` test series.

    ``model``: a served forecaster (``forecast_series``); ``data``: the job's ``TimeSeriesData``
    (values standardized; shown in the data's units)."""
    test, st = data.test, data.standardization
    count = min(n_series, test.n)
    fig = Figure(figsize=(4.5 * count, 3.8), layout="constrained")  # keeps the suptitle off the axes titles
    axes = np.atleast_1d(fig.subplots(1, count))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, ax in enumerate(axes):
        length, context = int(test.lengths[i]), int(data.context[i])
        t, mask = test.t[i, :length], test.mask[i, :length]
        y = st.inverse(test.y[i, :length])
        grid = np.linspace(t[0], t[-1], resolution)
        # the model sees the fitted span's observations only (node: its first point; latent_ode and
        # rnn: all of them), as in training and evaluation; the rest is extrapolated
        (mean,), _, _ = model.forecast_series([(t[:context], y[:context], mask[:context])], grid)
        fitted = grid <= t[context - 1]
        for d in range(min(test.dim, len(colors))):
            c = colors[d]
            ax.plot(grid[fitted], mean[fitted, d], c=c, lw=1.5, label=f"fit $y_{d + 1}$" if i == 0 else None)
            ax.plot(grid[~fitted], mean[~fitted, d], c=c, lw=1.5, ls="--",
                    label="extrapolated" if i == 0 and d == 0 else None)
            ax.scatter(t[mask[:, d]], y[mask[:, d], d], s=10, c=c, alpha=0.7,
                       label=f"observed $y_{d + 1}$" if i == 0 else None)
        ax.axvline(t[context - 1], c="0.7", lw=0.8, label="end of fitted span" if i == 0 else None)
        ax.set(title=f"test series {i}", xlabel="t (data's time units)", ylabel="y (data's units)" if i == 0 else None)
    axes[0].legend(loc="best", fontsize=7)
    fig.suptitle(title)
    return _png(fig)


def vector_field_png(model: Any, data: Any, title: str, resolution: int = 40, n_series: int = 8) -> bytes:
    """Streamlines of a 2-D ``node`` model's learned field f(t, y) = std ⊙ g_θ(t, (y − mean)/std) in the
    data's units (``vector_field.learned_field``) at the middle of the training time span, the first
    ``n_series`` test series on top; beside it, for a built-in generator with known dynamics
    (``timeseries.TRUE_FIELDS``), the true field. Colour: speed |f| (one scale for both panels).

    ``model``: a served forecaster holding a plain ``NeuralODE`` (``.model``, ``.standardization``);
    ``data``: the job's ``TimeSeriesData``. Raises ValueError for other models (see :func:`unavailable`).
    """
    from matplotlib.colors import Normalize

    from node_engine.datasets.timeseries import TRUE_FIELDS
    from node_engine.families import vector_field as vf

    st = model.standardization
    lo, hi = vf.observed_box(data.train, data.standardization)
    pad = 0.1 * (hi - lo) + 1e-3
    xs, ys, points = vf.grid_2d(lo - pad, hi + pad, resolution)
    start, end = vf.time_span(data.train)
    t_mid = 0.5 * (start + end)
    fields = [(f"learned field $f_\\theta$ at t = {t_mid:.3g}", vf.learned_field(model.model, st, points, t_mid))]
    true = TRUE_FIELDS.get(data.name)
    if true is not None:
        name = data.name.replace("_", " ").title().replace("Lotka Volterra", "Lotka–Volterra")
        fields.append((f"true field ({name})", np.asarray(true(t_mid, points.T), dtype=np.float64).T))
    speeds = [np.linalg.norm(f, axis=1) for _, f in fields]
    # one colour scale for both panels; the 95th percentile keeps a fast corner from darkening the rest
    norm = Normalize(vmin=0.0, vmax=max(float(np.percentile(s, 95)) for s in speeds) or 1.0)
    fig = Figure(figsize=(5.2 * len(fields) + 1.0, 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(fields), sharex=True, sharey=True))
    test = data.test
    for ax, (label, f), speed in zip(axes, fields, speeds):
        shape = (resolution, resolution)
        stream = ax.streamplot(xs, ys, f[:, 0].reshape(shape), f[:, 1].reshape(shape), color=speed.reshape(shape),
                               cmap="viridis", norm=norm, density=1.0, linewidth=0.9, arrowsize=0.9)
        for arrow in ax.patches:  # clipped to the axes: measuring each for the layout took seconds
            arrow.set_in_layout(False)
        for i in range(min(n_series, test.n)):
            length = int(test.lengths[i])
            observed = test.mask[i, :length].all(axis=1)
            y = data.standardization.inverse(test.y[i, :length])[observed]
            # points only: sparse irregular samples joined by lines would cut across the orbits
            ax.scatter(y[:, 0], y[:, 1], s=6, c="tab:red", alpha=0.75, zorder=3,
                       label=f"observed test series ({min(n_series, test.n)})" if i == 0 else None)
        ax.set(xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]), title=label, xlabel="$y_1$ (data's units)")
    axes[0].set_ylabel("$y_2$ (data's units)")
    axes[0].legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.colorbar(stream.lines, ax=list(axes), extend="max", label="speed |dy/dt| (data's units per time unit)")
    fig.suptitle(title)
    return _png(fig)


#: plot name -> drawer ``(served model, plot data (:func:`plot_data`), title) -> PNG bytes``
MODEL_PLOTS = {"density": density_png, "samples": samples_png, "trajectories": trajectories_png,
               "vector_field": vector_field_png}
#: plots drawn for models of any dimension
ANY_DIM = ("trajectories",)
#: plots drawn against the job's time series (``TimeSeriesData``) rather than its training points
SERIES_PLOTS = ("trajectories", "vector_field")
PLOTS = ("training", *MODEL_PLOTS)


def unavailable(name: str, model: Any) -> str | None:
    """Why plot ``name`` cannot be drawn for ``model`` (most need a 2-D model; ``vector_field`` a
    plain ``node`` model, ``node_engine.families.vector_field.field_unavailable``), or None."""
    dim = getattr(model, "dim", None)
    if dim != 2 and name not in ANY_DIM:
        return f"plot {name!r} needs a 2-D model; this one is {dim}-D"
    if name == "vector_field":
        from node_engine.families.vector_field import field_unavailable

        return field_unavailable(model)
    return None


def plot_data(name: str, spec: dict, upload_path: str | None = None) -> Any:
    """What plot ``name`` draws the model against: the job's ``TimeSeriesData`` (same split as
    training) for ``SERIES_PLOTS``, else :func:`training_points`."""
    if name in SERIES_PLOTS:
        from node_engine.datasets import load_dataset

        return load_dataset({**spec["dataset"], "path": upload_path})
    return training_points(spec, upload_path)


def training_points(spec: dict, upload_path: str | None = None) -> np.ndarray | None:
    """Training points of a job in original coordinates, or None (energy targets have none)."""
    from node_engine.datasets import load_dataset

    ds_spec = dict(spec["dataset"])
    ds_spec["n_samples"] = min(int(ds_spec.get("n_samples", 2000)), 5000)
    if upload_path is not None:
        ds_spec["path"] = upload_path
    data = load_dataset(ds_spec)
    train = getattr(data, "train", None)  # a point data set has a training split of points
    if train is None:
        return None
    return data.standardization.inverse(train.double().numpy())
