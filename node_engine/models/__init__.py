"""Models by ``model.type``: classifiers (odenet, rknet, resnet, mlp) and flows (cnf, planar)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

CLASSIFIER_TYPES = ("odenet", "rknet", "resnet", "mlp")
FLOW_TYPES = ("cnf", "planar")


def build_model(model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None, *,
                dim: int | None = None, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build the model a job spec names.

    Args:
        model_spec: the spec's ``model`` section (``type`` plus its sizes).
        solver_spec: the spec's ``solver`` section (method, rtol, atol, adjoint...).
        dim: data dimension D, required by flows (``cnf``, ``planar``).
        input_shape: image shape (C, H, W), required by classifiers.

    Returns:
        An ``nn.Module`` with a ``stats: SolverStats`` attribute and ``set_tolerances(rtol, atol)``.

    Raises:
        ValueError: unknown type or missing ``dim``/``input_shape``.
    """
    kind = model_spec.get("type") if isinstance(model_spec, Mapping) else None
    if kind in CLASSIFIER_TYPES:
        if input_shape is None:
            raise ValueError(f"model type {kind!r} needs input_shape (C, H, W)")
        from node_engine.models.classifiers import build_classifier

        return build_classifier(model_spec, solver_spec, input_shape)
    if kind in FLOW_TYPES:
        if dim is None:
            raise ValueError(f"model type {kind!r} needs the data dimension dim")
        if kind == "cnf":
            from node_engine.models.cnf import CNF

            return CNF.from_spec(model_spec, solver_spec, int(dim))
        from node_engine.models.planar import PlanarFlow

        return PlanarFlow.from_spec(model_spec, solver_spec, int(dim))
    raise ValueError(f"unknown model type {kind!r}; expected one of {', '.join(CLASSIFIER_TYPES + FLOW_TYPES)}")


__all__ = ["CLASSIFIER_TYPES", "FLOW_TYPES", "build_model"]
