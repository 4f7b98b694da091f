"""Unnormalized 2-D target densities U1-U4 of Rezende & Mohamed (2015), Table 1.

Each target is p(z) ∝ exp(-U(z)) on R², z = (z1, z2). They are the density-matching benchmark of
"Variational Inference with Normalizing Flows" (Fig. 3) that Chen et al. (2018, §4.1, Fig. 4) reuse
to compare planar flows with planar CNFs: a flow q is fitted by minimizing
KL(q || p) = E_q[log q(z) + U(z)] + log Z, which needs samples of q and their log-density only.

Helper functions (Table 1):
    w1(z) = sin(2π z1 / 4)
    w2(z) = 3 exp(-½ ((z1 - 1) / 0.6)²)
    w3(z) = 3 σ((z1 - 1) / 0.3),  σ(x) = 1 / (1 + e^{-x})
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["ENERGIES", "energy_u1", "energy_u2", "energy_u3", "energy_u4"]


def _check(z: Tensor) -> None:
    if z.dim() != 2 or z.shape[1] != 2:
        raise ValueError(f"energy targets are 2-D: expected z of shape (N, 2), got {tuple(z.shape)}")


def _w1(z: Tensor) -> Tensor:
    return torch.sin(2.0 * math.pi * z[:, 0] / 4.0)


def _w2(z: Tensor) -> Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[:, 0] - 1.0) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3.0 * torch.sigmoid((z[:, 0] - 1.0) / 0.3)


def _neg_log_sum_exp(a: Tensor, b: Tensor) -> Tensor:
    """-ln(e^a + e^b), computed stably (the terms underflow far from the modes)."""
    return -torch.logsumexp(torch.stack([a, b]), dim=0)


def energy_u1(z: Tensor) -> Tensor:
    """U1(z) = ½((‖z‖ - 2)/0.4)² - ln(e^{-½((z1 - 2)/0.6)²} + e^{-½((z1 + 2)/0.6)²}).

    A ring of radius 2 split into two arcs (Rezende & Mohamed 2015, Table 1).

    Args:
        z: (N, 2) points, any float dtype.
    Returns:
        (N,) energies U (nats; the density is ∝ exp(-U)).
    Raises:
        ValueError: z is not (N, 2).
    """
    _check(z)
    ring = 0.5 * ((z.norm(dim=1) - 2.0) / 0.4) ** 2
    left = -0.5 * ((z[:, 0] - 2.0) / 0.6) ** 2
    right = -0.5 * ((z[:, 0] + 2.0) / 0.6) ** 2
    return ring + _neg_log_sum_exp(left, right)


def energy_u2(z: Tensor) -> Tensor:
    """U2(z) = ½((z2 - w1(z))/0.4)², w1(z) = sin(2π z1/4). A sine-shaped ridge.

    Args:
        z: (N, 2) points.
    Returns:
        (N,) energies U.
    Raises:
        ValueError: z is not (N, 2).
    """
    _check(z)
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def energy_u3(z: Tensor) -> Tensor:
    """U3(z) = -ln(e^{-½((z2 - w1)/0.35)²} + e^{-½((z2 - w1 + w2)/0.35)²}), w2 = 3 e^{-½((z1-1)/0.6)²}.

    Two sine ridges that separate around z1 = 1.

    Args:
        z: (N, 2) points.
    Returns:
        (N,) energies U.
    Raises:
        ValueError: z is not (N, 2).
    """
    _check(z)
    w1, w2 = _w1(z), _w2(z)
    a = -0.5 * ((z[:, 1] - w1) / 0.35) ** 2
    b = -0.5 * ((z[:, 1] - w1 + w2) / 0.35) ** 2
    return _neg_log_sum_exp(a, b)


def energy_u4(z: Tensor) -> Tensor:
    """U4(z) = -ln(e^{-½((z2 - w1)/0.4)²} + e^{-½((z2 - w1 + w3)/0.35)²}), w3 = 3 σ((z1 - 1)/0.3).

    Two sine ridges offset by a sigmoid step.

    Args:
        z: (N, 2) points.
    Returns:
        (N,) energies U.
    Raises:
        ValueError: z is not (N, 2).
    """
    _check(z)
    w1, w3 = _w1(z), _w3(z)
    a = -0.5 * ((z[:, 1] - w1) / 0.4) ** 2
    b = -0.5 * ((z[:, 1] - w1 + w3) / 0.35) ** 2
    return _neg_log_sum_exp(a, b)


ENERGIES: dict[str, Callable[[Tensor], Tensor]] = {
    "u1": energy_u1,
    "u2": energy_u2,
    "u3": energy_u3,
    "u4": energy_u4,
}
