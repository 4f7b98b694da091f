"""What a model family is: the contract the trainer, the worker, inference and plots rely on.

A family (classifier, density, energy, ...) is one module with one :class:`Family` subclass that
says how to build its model from the spec, its loss on a batch, its evaluation and metric names,
what it serves (``log_density``, ``samples``, ``predict``, ...) and which plots it offers. Nothing
outside ``node_engine/families/`` switches on the family: the trainer calls these methods, the
service asks ``serves`` and ``plots``. Adding a family is one module plus one line in
``node_engine/families/__init__.py`` (and its tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from node_engine.models import MODEL_TYPES, build_model, model_types_for


class Family:
    """Base class of model families; subclasses set the class attributes and override the methods.

    Attributes:
        name: the one name of the family (checkpoint ``kind``, data-set ``kind``, docs).
        model_input: "points", "images" or "series": the model types taking this input fit the family.
        default_batch_size: ``training.batch_size`` when the spec gives none.
        finite_data: False when every step draws fresh samples (no epochs, no training split).
        serves: inference operations of its trained models ("log_density", "samples", "predict").
        plots: figures beyond "training" (drawn by ``service/plots.py``).
        train_metrics: keys of a step record beyond the common ones (loss, nfe, ...).
        eval_metrics: keys of an evaluation.
    """

    name: ClassVar[str] = ""
    model_input: ClassVar[str] = ""
    default_batch_size: ClassVar[int] = 512
    finite_data: ClassVar[bool] = True
    serves: ClassVar[tuple[str, ...]] = ()
    plots: ClassVar[tuple[str, ...]] = ()
    train_metrics: ClassVar[tuple[str, ...]] = ()
    eval_metrics: ClassVar[tuple[str, ...]] = ()

    # ---- model ----------------------------------------------------------------------------------
    @property
    def model_types(self) -> tuple[str, ...]:
        """The ``model.type`` values this family trains (from the model registry)."""
        return model_types_for(self.model_input)

    def check_model_type(self, model_type: Any, dataset: str) -> None:
        """Raises ValueError when ``model_type`` does not fit this family's data set ``dataset``."""
        if model_type not in self.model_types:
            raise ValueError(f"data set {dataset!r} trains a {self.name} model; model.type must be one of "
                             f"{', '.join(self.model_types)}, got {model_type!r}")

    def solves_ode(self, model_type: str) -> bool:
        return MODEL_TYPES[model_type].solves_ode

    def data_info(self, data: Any) -> dict[str, Any]:
        """JSON-ready shapes and sizes of ``data`` that rebuild the model (saved in checkpoints)."""
        raise NotImplementedError

    def resume_info(self, saved: Mapping[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """The data info to rebuild a checkpoint's model with: ``current`` (:meth:`data_info` of the
        data now) plus what the checkpoint ``saved`` decides about the model's construction."""
        return current

    def build_model(self, spec: Mapping[str, Any], info: Mapping[str, Any]) -> nn.Module:
        """The model of a normalized spec for data described by ``info`` (:meth:`data_info`).

        Raises:
            ValueError: invalid model options.
        """
        key = "input_shape" if self.model_input == "images" else "dim"
        value = info[key]
        kwargs = {key: int(value) if key == "dim" else tuple(int(s) for s in value)}
        return build_model(spec["model"], spec["solver"], **kwargs)

    # ---- training -------------------------------------------------------------------------------
    def train_tensors(self, data: Any) -> tuple[Tensor, ...]:
        """The training split as tensors sharing dim 0 (batches index them); () without a split."""
        return ()

    def loss(self, model: nn.Module, data: Any, batch: tuple[Tensor, ...], size: int,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Loss (0-dim, differentiable) of one batch (``size`` rows; drawn fresh when ``batch`` is
        empty) and its record metrics (floats, ``train_metrics``)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, *, batch_size: int, device: torch.device,
                 generator: torch.Generator) -> dict[str, Any]:
        """Metrics on the test split (``eval_metrics`` plus ``nfe_forward``), model in eval mode, no grad."""
        raise NotImplementedError

    def instability_hint(self, model_type: str, lr: float, solver: Mapping[str, Any]) -> str:
        """The likely cause of a non-finite loss, for the error message."""
        if not self.solves_ode(model_type):
            return f"the learning rate is probably too high (lr={lr:g}); lower it"
        return (f"usually the learning rate is too high (lr={lr:g}) or the learned dynamics became "
                f"stiff/unstable at rtol={solver['rtol']:g}, atol={solver['atol']:g}; lower lr, tighten the "
                f"tolerances, or add kinetic_energy/jacobian_norm regularization")

    # ---- serving --------------------------------------------------------------------------------
    def served(self, model: nn.Module, info: Mapping[str, Any], *, spec: dict[str, Any], step: int,
               metrics: dict[str, Any], device: torch.device) -> Any:
        """The inference object of a trained ``model`` (``node_engine.inference``); it has ``serves``."""
        raise NotImplementedError
