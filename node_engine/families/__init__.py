"""Model families as plugins: the one registry (``FAMILIES``) the trainer, worker, inference and
plots look families up in. See :mod:`node_engine.families.base` for the contract.

A data set's registry ``kind`` is the name of the family that trains on it. Checkpoints store the
family name as their ``kind``; ``ALIASES`` maps older names ("classification") to today's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node_engine.families.base import Family
from node_engine.families.classifier import ClassifierFamily
from node_engine.families.density import DensityFamily
from node_engine.families.energy import EnergyFamily
from node_engine.families.timeseries import TimeSeriesFamily

#: family name -> family (one registration line per family)
FAMILIES: dict[str, Family] = {f.name: f for f in (
    ClassifierFamily(),
    DensityFamily(),
    EnergyFamily(),
    TimeSeriesFamily(),
)}

#: older spellings of family names, still read from checkpoints
ALIASES = {"classification": "classifier"}


def get_family(name: Any) -> Family:
    """The family called ``name`` (or an alias of it). Raises ValueError listing the families."""
    family = FAMILIES.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return family


def family_for_dataset_name(name: Any) -> Family:
    """The family that trains on data set ``name``. Raises DatasetError for an unknown name."""
    from node_engine.datasets import get_entry

    return get_family(get_entry(name).kind)


def family_for_spec(spec: Mapping[str, Any]) -> Family:
    """The family of a job spec (from its data set). Raises DatasetError for an unknown data set."""
    return family_for_dataset_name(spec["dataset"]["name"])


__all__ = ["ALIASES", "FAMILIES", "Family", "family_for_dataset_name", "family_for_spec", "get_family"]
