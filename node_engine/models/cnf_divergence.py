"""Divergence tr(∂f/∂z) of a CNF vector field: exact and Hutchinson estimators.

The instantaneous change of variables (Chen et al. 2018, Thm. 1) needs tr(∂f/∂z) at every solver
stage. Exactly it costs D vector-Jacobian products; FFJORD (Grathwohl et al. 2019, eq. 7) replaces it
by Hutchinson's unbiased estimator E_ε[εᵀ (∂f/∂z) ε] with E[ε] = 0, Cov(ε) = I, costing one VJP.
The noise ε must be drawn once per solve and held fixed inside f: re-drawing it per evaluation makes
the dynamics stochastic and the adaptive solver's step count explode.

``divergence_exact`` is the generic fallback. ConcatSquash fields compute the exact trace by
forward-mode tangents instead (``ConcatSquashField.jacobian_trace``): no ``autograd.grad`` inside
the dynamics, so differentiating them is one backward pass, not a double backward. Batching the D
VJPs here into one ``autograd.grad(..., is_grads_batched=True)`` call was measured and is no faster
on CPU (the vmap'd double backward costs what the loop does), so the loop stays.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NOISES", "TRACE_ESTIMATORS", "divergence_exact", "divergence_hutchinson", "sample_noise"]

TRACE_ESTIMATORS = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")


def sample_noise(
    shape: tuple[int, ...],
    kind: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw Hutchinson noise ε with E[ε] = 0 and E[εεᵀ] = I.

    Args:
        shape: (N, D) usually.
        kind: "rademacher" (±1 with probability ½, the lower-variance choice) or "gaussian".
        dtype, device: of the result.
        generator: optional torch.Generator for reproducible draws. The draw happens on the
            generator's device and is then moved to ``device``, so a CPU generator gives the same
            noise on every device.
    Returns:
        Tensor of ``shape``.
    Raises:
        ValueError: unknown ``kind``.
    """
    where = generator.device if generator is not None else device
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=where)
        return (2 * bits - 1).to(device=device, dtype=dtype)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)
    raise ValueError(f"noise must be one of {NOISES}, got {kind!r}")


def divergence_exact(f: Tensor, z: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Exact tr(∂f/∂z) and ‖∂f/∂z‖_F² per sample from D vector-Jacobian products (row by row).

    Args:
        f: (N, D) vector field evaluated at ``z`` (inside the autograd graph of ``z``).
        z: (N, D) state with ``requires_grad``. Samples must not interact (row n of f depends only
            on row n of z), as in every CNF here.
        create_graph: keep the graph for a backward pass through the divergence (training).
    Returns:
        (div (N,), frobenius_sq (N,)): the trace and the squared Frobenius norm of the Jacobian.
    """
    div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    frob = torch.zeros_like(div)
    for i in range(f.shape[1]):
        row = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0]
        div = div + row[:, i]
        frob = frob + row.pow(2).sum(dim=1)
    return div, frob


def divergence_hutchinson(f: Tensor, z: Tensor, eps: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate εᵀ(∂f/∂z)ε of tr(∂f/∂z), plus the VJP εᵀ ∂f/∂z it is built from.

    The same VJP gives RNODE's Jacobian-norm estimate ‖εᵀ ∂f/∂z‖² (Finlay et al. 2020, eq. 9)
    at no extra cost.

    Args:
        f: (N, D) vector field at ``z``.
        z: (N, D) state with ``requires_grad``.
        eps: (N, D) noise, fixed for the whole solve.
        create_graph: keep the graph (training).
    Returns:
        (div (N,), vjp (N, D)).
    """
    vjp = torch.autograd.grad(f, z, grad_outputs=eps, create_graph=create_graph)[0]
    return (vjp * eps).sum(dim=1), vjp
