"""Density matching to an unnormalized target p ∝ exp(−U) (Rezende & Mohamed 2015, eq. 20; Chen et
al. 2018, §4.1): loss = E_q[log q(x) + U(x)] = KL(q‖p) − log Z, with fresh samples x ~ q every step.

Evaluation reports the same loss on 2000 samples and the effective sample size fraction of the
importance weights w = p̃/q. Served like a density model (``log_density``, ``samples``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from node_engine.families.density import FlowFamily

EVAL_SAMPLES = 2000


class EnergyFamily(FlowFamily):
    name: ClassVar[str] = "energy"
    finite_data: ClassVar[bool] = False
    train_metrics: ClassVar[tuple[str, ...]] = ("kl_minus_log_z",)
    eval_metrics: ClassVar[tuple[str, ...]] = ("test_loss", "test_ess")

    def data_info(self, data) -> dict[str, Any]:
        return {"dim": data.dim}

    def loss(self, model, data, batch, size, generator):
        x, log_q = model.sample_and_log_prob(size, generator=generator)
        loss = (log_q + data.energy(x)).mean()
        return loss, {"kl_minus_log_z": loss.item()}

    def evaluate(self, model, data, *, batch_size, device, generator):
        model.stats.reset()
        x, log_q = model.sample_and_log_prob(EVAL_SAMPLES, generator=generator)
        log_w = (-data.energy(x.detach()) - log_q.detach()).double()
        ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / len(log_w)
        return {"test_loss": float(-log_w.mean()), "test_ess": ess, "nfe_forward": float(model.stats.nfe_forward)}
