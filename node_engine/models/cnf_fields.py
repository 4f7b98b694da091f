"""Time-dependent vector fields f(t, z) for continuous normalizing flows.

Every field maps (t: 0-dim tensor, z: (N, D)) -> (N, D); samples never interact, so the Jacobian
∂f/∂z is block diagonal over the batch and per-sample traces come from batched VJPs. A field may also
provide ``analytic_divergence(t, z) -> (f, tr ∂f/∂z, ‖∂f/∂z‖_F²)`` when it has a closed form (the
planar field does); the CNF then uses it instead of autograd.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NONLINEARITIES", "ConcatSquashLinear", "ConcatSquashField", "PlanarField"]

NONLINEARITIES = {"tanh": nn.Tanh, "softplus": nn.Softplus}


def _time_column(t: Tensor | float, like: Tensor) -> Tensor:
    """t as a (1, 1) tensor with the dtype/device of ``like``; a per-sample time vector (N,)
    (``step_control="per_sample"`` solves) as an (N, 1) column."""
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return tt.reshape(1, 1) if tt.numel() == 1 else tt.reshape(-1, 1)


class ConcatSquashLinear(nn.Module):
    """y = (W x + c) ⊙ σ(a t + a0) + b t: a linear layer gated and shifted by time (FFJORD, App. B).

    Args:
        dim_in, dim_out: feature sizes.
    Shapes:
        forward(t: 0-dim, x: (N, dim_in)) -> (N, dim_out).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = _time_column(t, x)
        return self.linear(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class ConcatSquashField(nn.Module):
    """MLP of ConcatSquashLinear layers: D -> hidden_dims... -> D, nonlinearity between layers.

    Args:
        dim: data dimension D.
        hidden_dims: hidden widths, e.g. (64, 64, 64) (FFJORD's 2-D toy setting).
        nonlinearity: "tanh" or "softplus" (smooth, so the Jacobian the divergence needs exists).
    Raises:
        ValueError: unknown nonlinearity, empty or non-positive widths.
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64, 64), nonlinearity: str = "tanh"):
        super().__init__()
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}")
        widths = [int(dim), *[int(h) for h in hidden_dims], int(dim)]
        if min(widths) < 1:
            raise ValueError(f"dim and hidden_dims must be positive integers, got {widths}")
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = NONLINEARITIES[nonlinearity]()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class PlanarField(nn.Module):
    """Planar CNF field dz/dt = Σ_m u_m(t) tanh(w_m(t)ᵀz + b_m(t)) (Chen et al. 2018, §4, eq. 10).

    The M = ``width`` units' parameters come from a small hypernetwork of t (an MLP
    1 -> hidden_dims -> M(2D + 2)); like Chen et al.'s implementation, u_m is gated by σ(g_m(t)).
    The Jacobian is Σ_m h'(a_m) u_m w_mᵀ, so
        tr ∂f/∂z  = Σ_m h'(a_m) (u_m·w_m)                       O(MD)
        ‖∂f/∂z‖_F² = Σ_{m,m'} h'(a_m) h'(a_m') (u_m·u_m')(w_m·w_m')  O(M²D)
    with a_m = w_mᵀz + b_m, h = tanh.

    Args:
        dim: D.  width: M ≥ 1.  hidden_dims: the hypernetwork's hidden widths.
    """

    def __init__(self, dim: int, width: int = 16, hidden_dims: Sequence[int] = (32,)):
        super().__init__()
        if width < 1:
            raise ValueError(f"planar_width must be >= 1, got {width}")
        self.dim, self.width = int(dim), int(width)
        widths = [1, *[int(h) for h in hidden_dims]]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(widths[-1], self.width * (2 * self.dim + 2)))
        self.hypernet = nn.Sequential(*layers)

    def parameters_at(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w (M, D), u (M, D), b (M,)) at time t; u already gated."""
        out = self.hypernet(_time_column(t, like)).reshape(-1)
        m, d = self.width, self.dim
        w = out[: m * d].reshape(m, d)
        u = out[m * d : 2 * m * d].reshape(m, d)
        b = out[2 * m * d : 2 * m * d + m]
        gate = torch.sigmoid(out[2 * m * d + m :])
        return w, u * gate[:, None], b

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        w, u, b = self.parameters_at(t, z)
        return torch.tanh(z @ w.T + b) @ u

    def analytic_divergence(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f (N, D), tr ∂f/∂z (N,), ‖∂f/∂z‖_F² (N,)) in closed form."""
        w, u, b = self.parameters_at(t, z)
        h = torch.tanh(z @ w.T + b)  # (N, M)
        dh = 1.0 - h * h
        f = h @ u
        div = dh @ (u * w).sum(dim=1)
        gram = (u @ u.T) * (w @ w.T)  # (M, M)
        frob = ((dh @ gram) * dh).sum(dim=1)
        return f, div, frob
