"""Models by ``model.type``: the one registry of model types (``MODEL_TYPES``).

Each entry names its spec section (``node_engine.specs``: defaults and bounds), the input it takes
("points" (N, D) for flows, "images" (N, C, H, W) for classifiers, "series" (per-series times and
(T, D) values) for time-series models; a family accepts the types whose
input it provides) and whether it solves an ODE. Adding a model type is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from node_engine.specs import MODEL_SECTIONS


def _build_cnf(model_spec, solver_spec, info):
    from node_engine.models.cnf import CNF

    return CNF.from_spec(model_spec, solver_spec, int(info["dim"]))


def _build_planar(model_spec, solver_spec, info):
    from node_engine.models.planar import PlanarFlow

    return PlanarFlow.from_spec(model_spec, solver_spec, int(info["dim"]))


def _build_classifier(model_spec, solver_spec, info):
    from node_engine.models.classifiers import build_classifier

    return build_classifier(model_spec, solver_spec, tuple(info["input_shape"]),
                            min_channels_per_group=int(info.get("min_channels_per_group") or 2))


def _build_node(model_spec, solver_spec, info):
    from node_engine.models.node import NeuralODE

    return NeuralODE.from_spec(model_spec, solver_spec, int(info["dim"]))


def _build_latent_ode(model_spec, solver_spec, info):
    from node_engine.models.latent_ode import LatentODE

    return LatentODE.from_spec(model_spec, solver_spec, int(info["dim"]))


def _build_rnn(model_spec, solver_spec, info):
    from node_engine.models.rnn import GRUBaseline

    return GRUBaseline.from_spec(model_spec, solver_spec, int(info["dim"]))


@dataclass(frozen=True)
class ModelType:
    """One model type.

    Attributes:
        name: the spec's ``model.type``.
        input: "points" or "series" (need ``dim``) or "images" (needs ``input_shape`` (C, H, W)).
        solves_ode: whether training integrates an ODE (decides the hint of a diverging run).
        build: ``(model_spec, solver_spec, info) -> nn.Module`` with ``info["dim"]`` or ``info["input_shape"]``.
        per_row_grids: solves every series on its own time grid (per-sample stepping), so it needs an
            adaptive method (a fixed-grid method is refused at submission).
    """

    name: str
    input: str
    solves_ode: bool
    build: Callable[[Mapping[str, Any], Mapping[str, Any] | None, Mapping[str, Any]], nn.Module]
    per_row_grids: bool = False

    @property
    def section(self):
        """The spec section class (defaults and bounds) of this type."""
        return MODEL_SECTIONS[self.name]


#: model type -> :class:`ModelType`
MODEL_TYPES: dict[str, ModelType] = {m.name: m for m in (
    ModelType("cnf", "points", True, _build_cnf),
    ModelType("planar", "points", False, _build_planar),
    ModelType("odenet", "images", True, _build_classifier),
    ModelType("rknet", "images", True, _build_classifier),
    ModelType("resnet", "images", False, _build_classifier),
    ModelType("mlp", "images", False, _build_classifier),
    ModelType("node", "series", True, _build_node, per_row_grids=True),
    ModelType("latent_ode", "series", True, _build_latent_ode, per_row_grids=True),
    ModelType("rnn", "series", False, _build_rnn),
)}

_INFO_KEY = {"points": "dim", "images": "input_shape", "series": "dim"}


def model_types_for(input_kind: str) -> tuple[str, ...]:
    """The model types taking ``input_kind`` ("points" or "images"), in registry order."""
    return tuple(name for name, m in MODEL_TYPES.items() if m.input == input_kind)


def get_model_type(name: Any) -> ModelType:
    """The registry entry of ``name``. Raises ValueError listing the known types."""
    entry = MODEL_TYPES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown model type {name!r}; expected one of {', '.join(MODEL_TYPES)}")
    return entry


def build_model(model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None, *,
                dim: int | None = None, input_shape: tuple[int, ...] | None = None,
                min_channels_per_group: int | None = None) -> nn.Module:
    """Build the model a job spec names.

    Args:
        model_spec: the spec's ``model`` section (``type`` plus its sizes; missing sizes take the
            section's defaults, ``node_engine.specs``).
        solver_spec: the spec's ``solver`` section (method, rtol, atol, adjoint...).
        dim: data dimension D, required by point models (``cnf``, ``planar``).
        input_shape: image shape (C, H, W), required by image models (classifiers).
        min_channels_per_group: GroupNorm grouping of conv classifiers (default 2; 1 for checkpoints
            written before the grouping fix, see ``classifiers.group_norm``).

    Returns:
        An ``nn.Module`` with a ``stats: SolverStats`` attribute and ``set_tolerances(rtol, atol)``.

    Raises:
        ValueError: unknown type or missing ``dim``/``input_shape``.
    """
    entry = get_model_type(model_spec.get("type") if isinstance(model_spec, Mapping) else None)
    info = {"dim": dim, "input_shape": input_shape, "min_channels_per_group": min_channels_per_group}
    if info[_INFO_KEY[entry.input]] is None:
        raise ValueError(f"model type {entry.name!r} needs {_INFO_KEY[entry.input]}")
    return entry.build(model_spec, solver_spec, info)


__all__ = ["MODEL_TYPES", "ModelType", "build_model", "get_model_type", "model_types_for"]
