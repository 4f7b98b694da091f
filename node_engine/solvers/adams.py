"""Fixed-grid Adams methods under torchdiffeq's names: ``explicit_adams`` (Adams–Bashforth) and
``implicit_adams`` / ``fixed_adams`` (Adams–Bashforth–Moulton predictor–corrector, PECE).

Variable-step form (HNW I §III.5): the step from t_n to t_n+1 integrates the polynomial through the
last k derivatives f_n, f_n-1, ... (Adams–Bashforth) and, for the corrector, through f(t_n+1, y_pred)
and the last k-1 ones (Adams–Moulton), so grids that mix a step size with the output times keep the
order. The weights are ∫_0^h L_j(s) ds of the Lagrange basis on the past nodes (float64 numpy, once
per step). The first k-1 steps are classical RK4 steps (the starter, as torchdiffeq), so the global error is
O(h^k) with k = ``ORDER`` = 4. Derivatives are kept with their autograd graph, so backprop through
``odeint`` works; the backsolve adjoint integrates its augmented system with the same method.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["AdamsStepper", "ADAMS_METHODS", "ORDER"]

ORDER = 4
ADAMS_METHODS = {"explicit_adams": False, "implicit_adams": True, "fixed_adams": True}  # name -> corrector


def _weights(nodes: np.ndarray, h: float) -> np.ndarray:
    """w_j = ∫_0^h L_j(s) ds for the Lagrange basis L_j on ``nodes`` (relative to t_n)."""
    n = len(nodes)
    w = np.empty(n)
    for j in range(n):
        others = np.delete(nodes, j)
        p = np.poly1d(others, r=True) / np.prod(nodes[j] - others) if n > 1 else np.poly1d([1.0])
        P = np.polyint(p)
        w[j] = P(h) - P(0.0)
    return w


class AdamsStepper:
    """Steps with the interface ``integrate_fixed`` uses; one instance per solve (keeps the history)."""

    def __init__(self, name: str, work_shape, device, dtype):
        self.name = name
        self.corrector = ADAMS_METHODS[name]
        self.shape = torch.Size(work_shape)
        self.device, self.dtype = device, dtype
        self.fsal = False
        self.per_row = False
        self.hist: list[tuple[float, torch.Tensor]] = []  # (t_i, f_i), newest first

    def step(self, vf, t, t_new, t_end_eval, z: torch.Tensor, k1: torch.Tensor):
        """z_new (N,) from (t, z) to t_new; ``k1 = f(t, z)`` joins the history."""
        if self.hist and (self.hist[0][0] - t) * (t_new - t) > 0:  # a new solve in the other direction
            self.hist = []
        self.hist.insert(0, (t, k1.reshape(-1)))
        del self.hist[ORDER:]
        h = t_new - t
        zf = z.reshape(-1)
        if len(self.hist) < ORDER:  # starter: classical RK4 until k past derivatives exist
            k1f = self.hist[0][1]
            k2 = vf(t + h / 2, (zf + (h / 2) * k1f).view(self.shape)).reshape(-1)
            k3 = vf(t + h / 2, (zf + (h / 2) * k2).view(self.shape)).reshape(-1)
            k4 = vf(t_end_eval, (zf + h * k3).view(self.shape)).reshape(-1)
            return zf + (h / 6) * (k1f + 2 * k2 + 2 * k3 + k4)
        nodes = np.array([ti - t for ti, _ in self.hist])
        w = _weights(nodes, h)
        fs = torch.stack([f for _, f in self.hist])
        z_new = zf + torch.as_tensor(w, dtype=self.dtype, device=self.device) @ fs
        if self.corrector:
            f_pred = vf(t_end_eval, z_new.view(self.shape)).reshape(-1)
            nodes_c = np.concatenate([[h], nodes[: ORDER - 1]])
            wc = torch.as_tensor(_weights(nodes_c, h), dtype=self.dtype, device=self.device)
            z_new = zf + wc @ torch.cat([f_pred.unsqueeze(0), fs[: ORDER - 1]])
        return z_new
