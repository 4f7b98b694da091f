"""Hooks through which a running trainer reports progress and is asked to stop."""

from __future__ import annotations

from typing import Any


class TrainingCallbacks:
    """Base class; every hook is a no-op. Subclass and override what you need (the worker does).

    Hooks run in the training thread between optimizer steps; a slow hook slows training.
    """

    def on_step(self, record: dict[str, Any]) -> None:
        """Per-iteration metrics (every ``log_every`` steps): step, loss, then ``nll`` and ``bits_per_dim``
        (density; original coordinates), ``accuracy`` (classifier) or ``kl_minus_log_z`` (energy target),
        nfe_forward, nfe_backward, ``step_size`` (mean accepted step of this step's forward solves, in
        the time units of the ODE's t; absent for models without an ODE solve), wall_seconds (this step), elapsed_seconds (run so far), lr, grad_norm,
        regularizers ({name: weighted value}), and ``epoch`` for data-set objectives."""

    def on_eval(self, metrics: dict[str, Any]) -> None:
        """Test-split evaluation: step, nfe_forward (mean per solve) and test_nll + test_bits_per_dim (density),
        test_accuracy + test_loss (classifier) or test_loss + test_ess (energy target)."""

    def on_checkpoint(self, name: str, data: bytes) -> None:
        """A checkpoint: ``name`` like "step-000100.safetensors" or "final.safetensors"; ``data`` safetensors bytes."""

    def should_stop(self) -> bool:
        """Cooperative cancellation, asked before every step. Return True to stop after saving a checkpoint."""
        return False
