"""Density estimation by maximum likelihood (FFJORD, Grathwohl et al. 2019; Chen et al. 2018, §4).

Loss = E_data[−log p(z)] in standardized coordinates z = (x − mean)/std; NLL is reported in the
user's original coordinates, nll_x = nll_z + Σ log std, and bits/dim = nll_x / (D ln 2).
Serves ``log_density`` and ``samples``; plots ``density`` and ``samples`` (2-D).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from node_engine.families.base import Family


class FlowFamily(Family):
    """What density and energy share: flows on points (cnf, planar), served as a ``DensityModel``."""

    model_input: ClassVar[str] = "points"
    default_batch_size: ClassVar[int] = 512  # FFJORD's batch size
    serves: ClassVar[tuple[str, ...]] = ("log_density", "samples")
    plots: ClassVar[tuple[str, ...]] = ("density", "samples")

    def instability_hint(self, model_type: str, lr: float, solver) -> str:
        hint = super().instability_hint(model_type, lr, solver)
        return hint + ("" if self.solves_ode(model_type) else " or use more layers (planar flows saturate)")

    def served(self, model, info, *, spec, step, metrics, device):
        from node_engine.datasets import Standardization
        from node_engine.inference import DensityModel

        return DensityModel(model, Standardization.from_json(info["standardization"]), spec=spec, step=step,
                            metrics=metrics, device=device)


class DensityFamily(FlowFamily):
    name: ClassVar[str] = "density"
    train_metrics: ClassVar[tuple[str, ...]] = ("nll", "bits_per_dim")
    eval_metrics: ClassVar[tuple[str, ...]] = ("test_nll", "test_bits_per_dim")

    def data_info(self, data) -> dict[str, Any]:
        return {"dim": data.dim, "n_train": int(len(data.train)), "n_test": int(len(data.test))}

    def train_tensors(self, data):
        return (data.train,)

    def _nll(self, nll_z: float, data) -> float:
        return nll_z - data.standardization.log_abs_det_jacobian(data.dim)

    def loss(self, model, data, batch, size, generator):
        log_p = model.log_prob(batch[0], generator=generator)
        loss = -log_p.mean()
        nll = self._nll(loss.item(), data)
        return loss, {"nll": nll, "bits_per_dim": nll / (data.dim * math.log(2.0))}

    def evaluate(self, model, data, *, batch_size, device, generator):
        x = data.test.to(device)
        stats = model.stats
        total, nfe, solves = 0.0, 0, 0
        for start in range(0, len(x), batch_size):
            stats.reset()
            log_p = model.log_prob(x[start:start + batch_size], generator=generator).detach()
            nfe, solves = nfe + stats.nfe_forward, solves + 1
            total += float(log_p.double().sum())
        nll = self._nll(-total / len(x), data)
        return {"test_nll": nll, "test_bits_per_dim": nll / (data.dim * math.log(2.0)), "nfe_forward": nfe / solves}
