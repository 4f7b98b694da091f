"""Trained models from checkpoint bytes, for log-density, sampling and prediction (no training state).

Coordinates: a density model works in standardized coordinates z = (x − mean)/std internally and
reports log p_x(x) = log p_z(z) − Σ log std in the user's original coordinates (change of variables).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from node_engine.checkpoint import load_checkpoint, load_state_strict
from node_engine.datasets import Standardization
from node_engine.errors import CheckpointError
from node_engine.models import build_model

MAX_POINTS_PER_BATCH = 4096


def _eval_tolerances(model: torch.nn.Module, solver: dict[str, Any]) -> None:
    rtol = solver.get("eval_rtol") or solver.get("rtol")
    atol = solver.get("eval_atol") or solver.get("atol")
    if rtol and atol:
        model.set_tolerances(float(rtol), float(atol))


class DensityModel:
    """A trained flow (cnf or planar) in the user's coordinates.

    Attributes:
        dim: data dimension D.
        model: the underlying ``nn.Module`` (eval mode).
        standardization: the data set's affine statistics.
        spec, step, metrics: the job spec, the training step and the last evaluation of the checkpoint.
    """

    def __init__(self, model: torch.nn.Module, standardization: Standardization, *, spec: dict[str, Any],
                 step: int, metrics: dict[str, Any], device: torch.device):
        self.model = model.eval()
        self.standardization = standardization
        self.dim = int(standardization.mean.size)
        self.spec, self.step, self.metrics, self.device = spec, step, metrics, device
        self._dtype = next(model.parameters()).dtype

    def log_density(self, points: np.ndarray) -> tuple[np.ndarray, int]:
        """log p(x) of points in original coordinates.

        Args:
            points: (N, D) float array (any real dtype; computed in the model's float32).
        Returns:
            (log-densities (N,) float64 nats, total NFE of the forward solves).
        Raises:
            ValueError: wrong shape or non-finite points. SolverError subclasses on a failed solve.
        """
        x = np.asarray(points, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must have shape (N, {self.dim}), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("points must be finite (no NaN/inf)")
        z = torch.as_tensor(self.standardization.forward(x), dtype=self._dtype, device=self.device)
        stats = self.model.stats
        stats.reset()
        generator = torch.Generator().manual_seed(0)  # Hutchinson: reproducible answers, on any device
        out = []
        solver = getattr(self.model, "solver", None)
        if solver is not None and hasattr(solver, "step_control"):
            # per-sample step control: a point's answer does not depend on the rest of the request
            self.model.solver = replace(solver, step_control="per_sample")
        with torch.no_grad():
            for start in range(0, len(z), MAX_POINTS_PER_BATCH):
                out.append(self.model.log_prob(z[start:start + MAX_POINTS_PER_BATCH], generator=generator))
        log_pz = torch.cat(out).double().cpu().numpy() if out else np.zeros(0)
        return log_pz + self.standardization.log_abs_det_jacobian(self.dim), int(stats.nfe_forward)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples in original coordinates, reproducible by ``seed``. Returns (n, D) float64.

        Raises:
            ValueError: n < 1.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        generator = torch.Generator().manual_seed(int(seed))  # host draws: the same samples on any device
        with torch.no_grad():
            z = self.model.sample(int(n), generator=generator)
        return self.standardization.inverse(z.double().cpu().numpy())

    def bits_per_dim(self, log_density: np.ndarray) -> np.ndarray:
        """−log p / (D ln 2): nats per point -> bits per dimension."""
        return -np.asarray(log_density) / (self.dim * math.log(2.0))


class ClassifierModel:
    """A trained image classifier.

    Attributes:
        input_shape: (C, H, W) the model expects, in the data set's raw pixel units (e.g. 0..16 for digits).
    """

    def __init__(self, model: torch.nn.Module, standardization: Standardization, input_shape: tuple[int, int, int],
                 *, spec: dict[str, Any], step: int, metrics: dict[str, Any], device: torch.device):
        self.model = model.eval()
        self.standardization = standardization
        self.input_shape = tuple(int(s) for s in input_shape)
        self.spec, self.step, self.metrics, self.device = spec, step, metrics, device

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities of raw images.

        Args:
            inputs: (N, C, H, W) or (N, H, W) in the training data's raw pixel units.
        Returns:
            (N, 10) float64 softmax probabilities.
        Raises:
            ValueError: shape differs from ``input_shape`` or non-finite values.
        """
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"inputs must have shape (N, {', '.join(map(str, self.input_shape))}) "
                             f"or (N, {self.input_shape[1]}, {self.input_shape[2]}), got {np.shape(inputs)}")
        if not np.all(np.isfinite(x)):
            raise ValueError("inputs must be finite (no NaN/inf)")
        x = (x - self.standardization.mean[0]) / self.standardization.std[0]
        with torch.no_grad():
            logits = self.model(torch.as_tensor(x, dtype=torch.float32, device=self.device))
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


def load_model(data: bytes, *, device: str | torch.device = "cpu") -> DensityModel | ClassifierModel:
    """A model for inference from checkpoint bytes (``Trainer.checkpoint()`` / ``on_checkpoint`` data).

    Returns:
        :class:`DensityModel` for "density"/"energy" checkpoints, :class:`ClassifierModel` for "classifier".
    Raises:
        CheckpointError: corrupted, tampered, or inconsistent with its own spec.
    """
    ckpt = load_checkpoint(data)
    device = torch.device(device)
    try:
        standardization = Standardization.from_json(ckpt.dataset["standardization"])
        spec = ckpt.spec
        metrics = dict(ckpt.extra.get("last_eval") or {})
        if ckpt.kind == "classifier":
            input_shape = tuple(int(s) for s in ckpt.dataset["input_shape"])
            model = build_model(spec["model"], spec["solver"], input_shape=input_shape)
        elif ckpt.kind in ("density", "energy"):
            model = build_model(spec["model"], spec["solver"], dim=int(ckpt.dataset["dim"]))
        else:
            raise CheckpointError(f"unknown checkpoint kind {ckpt.kind!r}")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is inconsistent: {exc}") from exc
    load_state_strict(model, ckpt.model_state)
    model.to(device)
    _eval_tolerances(model, spec.get("solver", {}))
    if ckpt.kind == "classifier":
        return ClassifierModel(model, standardization, input_shape, spec=spec, step=ckpt.step, metrics=metrics,
                               device=device)
    return DensityModel(model, standardization, spec=spec, step=ckpt.step, metrics=metrics, device=device)
