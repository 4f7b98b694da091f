"""Trained models from checkpoint bytes, for log-density, sampling and prediction (no training state).

Coordinates: a density model works in standardized coordinates z = (x − mean)/std internally and
reports log p_x(x) = log p_z(z) − Σ log std in the user's original coordinates (change of variables).

Served answers do not depend on the batch a point is sent in (issue 12): every ODE is solved with
per-sample step control (each point or image its own steps), Hutchinson noise is keyed by each
point's own value, base samples by (seed, index), and the model runs in float64 (``SERVE_DTYPE``)
so that round-off differences between batched kernels cannot flip a step's accept decision.
Which object a checkpoint gives, and what it serves, is its model family's word
(``node_engine.families``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node_engine.checkpoint import load_checkpoint, load_state_strict
from node_engine.datasets import Standardization
from node_engine.errors import CheckpointError, SolveStatus
from node_engine.models.keyed_noise import keyed_normal
from node_engine.specs import SolverSection

MAX_POINTS_PER_BATCH = 4096
SERVE_DTYPE = torch.float64  #: dtype of served answers (float32 round-off can flip accept decisions)


class DensityModel:
    """A trained flow (cnf or planar) in the user's coordinates. Serves ``log_density`` and ``samples``.

    Attributes:
        dim: data dimension D.
        model: the underlying ``nn.Module`` (eval mode).
        standardization: the data set's affine statistics.
        spec, step, metrics: the job spec, the training step and the last evaluation of the checkpoint.
    """

    def __init__(self, model: torch.nn.Module, standardization: Standardization, *, spec: dict[str, Any],
                 step: int, metrics: dict[str, Any], device: torch.device):
        self.model = model.eval()
        if isinstance(getattr(model, "solver", None), SolverSection):
            # a failed row gets a status, not an exception for the whole batch (see log_density_rows)
            model.use_solver(dataclasses.replace(model.solver, raise_on_failure=False))
        self.standardization = standardization
        self.dim = int(standardization.mean.size)
        self.spec, self.step, self.metrics, self.device = spec, step, metrics, device
        self._dtype = next(model.parameters()).dtype

    serves = ("log_density", "samples")

    def log_density(self, points: np.ndarray) -> tuple[np.ndarray, int]:
        """log p(x) of points in original coordinates.

        Args:
            points: (N, D) float array (any real dtype; computed in the model's dtype, float64 when
                loaded by :func:`load_model`). A point's answer is the same alone or in any batch.
        Returns:
            (log-densities (N,) float64 nats, total NFE of the forward solves).
        Raises:
            ValueError: wrong shape or non-finite points. SolverError subclasses when a point's solve
                failed (the first failed point is named).
        """
        log_p, status, nfe = self.log_density_rows(points)
        raise_for_rows(status, "point")
        return log_p, nfe

    def log_density_rows(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Like :meth:`log_density`, but a point whose solve fails does not fail the call.

        Returns:
            (log-densities (N,) float64 nats, NaN where the solve failed; statuses (N,) int64
            :class:`~node_engine.errors.SolveStatus` codes, 0 = success; total NFE).
        Raises:
            ValueError: wrong shape, non-finite points, or coordinates that overflow the model's dtype
                (:meth:`out_of_range`).
        """
        x = np.asarray(points, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must have shape (N, {self.dim}), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("points must be finite (no NaN/inf)")
        bad = self.out_of_range(x)
        if len(bad):
            i, j = (int(v) for v in bad[0])
            raise ValueError(f"point {i}, coordinate {j}: {x[i, j]:g} overflows the model's {self._dtype} "
                             f"once standardized (|x| at most {self.max_abs_input()[j]:g})")
        z = torch.as_tensor(self.standardization.forward(x), dtype=self._dtype, device=self.device)
        stats = self.model.stats
        stats.reset()
        out, statuses = [], []
        with torch.no_grad():  # eval mode, no generator: Hutchinson noise keyed per point
            for start in range(0, len(z), MAX_POINTS_PER_BATCH):
                out.append(self.model.log_prob(z[start:start + MAX_POINTS_PER_BATCH]))
                statuses.append(self._row_status(len(out[-1])))
        status = np.concatenate(statuses) if statuses else np.zeros(0, np.int64)
        log_pz = torch.cat(out).double().cpu().numpy() if out else np.zeros(0)
        log_p = log_pz + self.standardization.log_abs_det_jacobian(self.dim)
        log_p[status != 0] = np.nan
        return log_p, status, int(stats.nfe_forward)

    def max_abs_input(self) -> np.ndarray:
        """(D,) the largest |x| per coordinate whose standardized value (x − mean)/std the model's dtype
        still represents (finite), with a margin of 2 for the subtraction of the mean."""
        big = float(torch.finfo(self._dtype).max)
        std = np.broadcast_to(np.asarray(self.standardization.std, dtype=np.float64).reshape(-1), (self.dim,))
        return np.minimum(big * np.minimum(std, 1.0) / 2.0, np.finfo(np.float64).max)

    def out_of_range(self, points: np.ndarray) -> np.ndarray:
        """(K, 2) indices (point, coordinate) of the finite coordinates of ``points`` (N, D) that overflow
        the model's dtype once standardized (see :meth:`max_abs_input`); empty when all fit. Such a point
        cannot be evaluated at all, unlike one whose log-density merely underflows (−inf, :func:`row_reasons`)."""
        x = np.asarray(points, dtype=np.float64)
        return np.argwhere(np.abs(x) > self.max_abs_input()[None, :])

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples in original coordinates. Returns (n, D) float64.

        Sample i is a function of (seed, i) only: its base point z_i(0) is keyed by (seed, i)
        (:func:`node_engine.models.keyed_noise.keyed_normal`, the same on every device) and pushed
        through the flow with per-sample steps, so ``sample(4, s)[:1] == sample(1, s)``.

        Raises:
            ValueError: n < 1. SolverError subclasses when a sample's solve failed.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        z0 = keyed_normal(int(seed), int(n), self.dim, dtype=self._dtype, device=self.device)
        parts, statuses = [], []
        with torch.no_grad():
            for start in range(0, len(z0), MAX_POINTS_PER_BATCH):
                parts.append(self.model.generate(z0[start:start + MAX_POINTS_PER_BATCH]))
                statuses.append(self._row_status(len(parts[-1])))
        raise_for_rows(np.concatenate(statuses), "sample")
        x = torch.cat(parts)
        return self.standardization.inverse(x.double().cpu().numpy())

    def _row_status(self, n: int) -> np.ndarray:
        """(n,) SolveStatus codes of the model's last call (a flow without an ODE has none: all 0)."""
        status = getattr(self.model, "row_status", None)
        return np.zeros(n, np.int64) if status is None else status.cpu().numpy().astype(np.int64)

    def bits_per_dim(self, log_density: np.ndarray) -> np.ndarray:
        """−log p / (D ln 2): nats per point -> bits per dimension."""
        return -np.asarray(log_density) / (self.dim * math.log(2.0))


class ClassifierModel:
    """A trained image classifier. Serves ``predict``.

    Attributes:
        input_shape: (C, H, W) the model expects, in the data set's raw pixel units (e.g. 0..16 for digits).
    """

    def __init__(self, model: torch.nn.Module, standardization: Standardization, input_shape: tuple[int, int, int],
                 *, spec: dict[str, Any], step: int, metrics: dict[str, Any], device: torch.device):
        self.model = model.eval()
        self.standardization = standardization
        self.input_shape = tuple(int(s) for s in input_shape)
        self.spec, self.step, self.metrics, self.device = spec, step, metrics, device
        self._dtype = next(model.parameters()).dtype

    serves = ("predict",)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities of raw images.

        Args:
            inputs: (N, C, H, W) or (N, H, W) in the training data's raw pixel units.
        Returns:
            (N, 10) float64 softmax probabilities; an image's row is the same alone or in any batch
            (per-sample steps in the ODE blocks, per-image GroupNorm).
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
            logits = self.model(torch.as_tensor(x, dtype=self._dtype, device=self.device))
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


#: reasons of :func:`row_reasons`, by what happened to the row
UNDERFLOW_REASON = ("underflow: log p is below the smallest float64 (the density is 0 to machine precision; "
                    "the point is far outside the data)")
NON_FINITE_REASON = "non-finite: the model's log-density is NaN or +inf at this point"


def row_reasons(log_p: np.ndarray, status: np.ndarray) -> list[str | None]:
    """Why each row of :meth:`DensityModel.log_density_rows` has no finite answer (None: it has one).

    Args:
        log_p: (N,) log-densities (nats), NaN where the solve failed.
        status: (N,) :class:`~node_engine.errors.SolveStatus` codes.
    Returns:
        (N,) list: None for a finite answer; else ``"<status>: ..."`` for a failed solve (e.g.
        ``"max_num_steps: ..."``), :data:`UNDERFLOW_REASON` for −inf (underflow, not an error of the
        solve), :data:`NON_FINITE_REASON` for NaN/+inf from a successful solve.
    """
    reasons: list[str | None] = []
    for value, code in zip(np.asarray(log_p, dtype=np.float64).tolist(), np.asarray(status).tolist()):
        if code != SolveStatus.SUCCESS:
            code = SolveStatus(int(code))
            reasons.append(f"{code.name.lower()}: the ODE solve of this point failed ({code.error.__name__})")
        elif math.isfinite(value):
            reasons.append(None)
        elif value == -math.inf:
            reasons.append(UNDERFLOW_REASON)
        else:
            reasons.append(NON_FINITE_REASON)
    return reasons


def raise_for_rows(status: np.ndarray, what: str) -> None:
    """Raise the named SolverError of the first row whose status is not SUCCESS (``what`` i: ...)."""
    failed = np.flatnonzero(np.asarray(status))
    if failed.size:
        code = SolveStatus(int(status[failed[0]]))
        raise code.error(f"{what} {int(failed[0])}: the ODE solve failed ({code.name.lower()}); "
                         f"{failed.size} of {len(status)} failed")


def load_model(data: bytes | str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = SERVE_DTYPE) -> DensityModel | ClassifierModel:
    """A model for inference from a checkpoint: its bytes (``Trainer.checkpoint()``, ``on_checkpoint``
    data) or the path of a ``.safetensors`` file (e.g. downloaded from ``/v1/jobs/{id}/checkpoints``).
    Also ``from node_engine import load_model``.

    The checkpoint's ``kind`` names its model family, which builds the model and wraps it (density
    and energy: :class:`DensityModel`; classifier, or the older "classification": :class:`ClassifierModel`).
    Its ODEs are solved with the evaluation tolerances and per-sample step control.

    Args:
        dtype: the served model's floating dtype (float64 by default, see ``SERVE_DTYPE``).
    Raises:
        CheckpointError: corrupted, tampered, of an unknown family, or inconsistent with its own spec.
        FileNotFoundError: ``data`` is a path to no file.
    """
    from node_engine.families import get_family

    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = Path(data).read_bytes()  # a safetensors file: no pickle, safe to read from anywhere
    ckpt = load_checkpoint(bytes(data))
    device = torch.device(device)
    try:
        family = get_family(ckpt.kind)
    except ValueError as exc:
        raise CheckpointError(f"unknown checkpoint kind {ckpt.kind!r}: {exc}") from None
    try:
        spec = ckpt.spec
        model = family.build_model(spec, ckpt.dataset)
        solver = SolverSection.from_spec(spec.get("solver"), strict=False).served()
        Standardization.from_json(ckpt.dataset["standardization"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is inconsistent: {exc}") from exc
    load_state_strict(model, ckpt.model_state)
    model.to(device=device, dtype=dtype)
    model.use_solver(solver)
    metrics = dict(ckpt.extra.get("last_eval") or {})
    return family.served(model.eval(), ckpt.dataset, spec=spec, step=ckpt.step, metrics=metrics, device=device)
