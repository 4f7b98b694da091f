"""Gradients with respect to the output times ``t`` of a solve backpropagated through (``odeint``).

y(t_i) depends on t_i through dy/dt = f(t_i, y(t_i)), and on t_0 through the flow's dependence on
its start: ∂y(t_i)/∂t_0 = -Φ(t_i, t_0) f(t_0, y_0). So dL/dt_i = g_i · f(t_i, y_i) for i >= 1 and
dL/dt_0 = -a(t_0⁺) · f(t_0, y_0), a(t_0⁺) the gradient reaching y_0 through the solve (not through
out[0] = y_0 itself). These are the derivatives of the exact solution (the adjoint uses the same
formula, :func:`node_engine.adjoint._time_gradient`); the discrete solve differs by its own error.
One field evaluation per output time, under no_grad (no double backward through t).
"""

from __future__ import annotations

import torch

__all__ = ["start_time_gradient", "output_time_gradient"]


class _StartTime(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vf, t0: float, t: torch.Tensor, z0: torch.Tensor):
        ctx.vf, ctx.t0, ctx.T = vf, t0, t.shape[0]
        ctx.t_dtype, ctx.t_device = t.dtype, t.device
        ctx.save_for_backward(z0)
        return z0.clone()

    @staticmethod
    def backward(ctx, g):
        (z0,) = ctx.saved_tensors
        gt = torch.zeros(ctx.T, dtype=torch.float64)
        with torch.no_grad():
            f = ctx.vf.at(ctx.t0, z0.detach())
            gt[0] = -torch.dot(g.reshape(-1).double(), f.reshape(-1).double())
        return None, None, gt.to(ctx.t_device, ctx.t_dtype), g


class _OutputTimes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vf, times, t: torch.Tensor, out: torch.Tensor):
        ctx.vf, ctx.times = vf, times
        ctx.t_dtype, ctx.t_device = t.dtype, t.device
        ctx.save_for_backward(out)
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        gt = torch.zeros(len(ctx.times), dtype=torch.float64)
        with torch.no_grad():
            for i in range(1, len(ctx.times)):
                f = ctx.vf.at(ctx.times[i], out[i].detach())
                gt[i] = torch.dot(g[i].reshape(-1).double(), f.reshape(-1).double())
        return None, None, gt.to(ctx.t_device, ctx.t_dtype), g


def start_time_gradient(t: torch.Tensor, z0: torch.Tensor, vf, t0: float) -> torch.Tensor:
    """z0 (N,) to start the solve from, carrying dL/dt_0 (``vf``: a fresh
    :class:`~node_engine.solvers.state.VectorField`, so the solve's NFE count is unchanged)."""
    return _StartTime.apply(vf, t0, t, z0)


def output_time_gradient(t: torch.Tensor, out: torch.Tensor, z0: torch.Tensor, vf, times) -> torch.Tensor:
    """The solve's (T, N) outputs with out[0] = ``z0`` (the unwrapped start) and dL/dt_i attached."""
    out = torch.cat([z0.unsqueeze(0), out[1:]])
    return _OutputTimes.apply(vf, list(times), t, out)
