"""Data sets by name: 2-D toys, energy targets, digits, MNIST (IDX), uploaded arrays, time series. See :mod:`.registry`."""

from node_engine.datasets.registry import (
    DATASETS,
    ClassificationData,
    Dataset,
    DatasetEntry,
    DensityData,
    EnergyData,
    TimeSeriesData,
    UPLOADS,
    get_entry,
    load_dataset,
)
from node_engine.datasets.standardize import Standardization, split_indices
from node_engine.errors import DatasetError

__all__ = ["DATASETS", "ClassificationData", "Dataset", "DatasetEntry", "DatasetError", "DensityData",
           "EnergyData", "Standardization", "TimeSeriesData", "UPLOADS", "get_entry", "load_dataset", "split_indices"]
