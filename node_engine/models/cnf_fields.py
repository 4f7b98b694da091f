"""Time-dependent vector fields f(t, z) for continuous normalizing flows.

Every field maps (t: 0-dim tensor, z: (N, D)) -> (N, D); samples never interact, so the Jacobian
∂f/∂z is block diagonal over the batch and per-sample traces come from batched VJPs. A field may also
provide ``analytic_divergence(t, z) -> (f, tr ∂f/∂z, ‖∂f/∂z‖_F²)`` when it has a closed form (the
planar field does); the CNF then uses it instead of autograd. ``ConcatSquashField`` instead has
``jacobian_trace(t, z)``: the exact trace (and Frobenius norm) from forward-mode tangents pushed
through the MLP alongside f, so the exact-trace CNF needs no ``autograd.grad`` inside the dynamics.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
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


_ONES: dict[tuple, Tensor] = {}


def _one(like: Tensor) -> Tensor:
    """A cached 0-dim 1 of ``like``'s dtype/device (a broadcast operand, never written)."""
    key = (like.dtype, like.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return one


def _act_with_derivative(name: str, pre: Tensor) -> tuple[Tensor, Tensor]:
    """(σ(pre), σ'(pre)) for the field nonlinearities, σ' as autograd computes it."""
    if name == "tanh":
        h = torch.tanh(pre)
        return h, 1.0 - h * h
    # nn.Softplus(beta=1, threshold=20): linear above the threshold, derivative exactly 1 there
    return F.softplus(pre), torch.where(pre > 20.0, 1.0, torch.sigmoid(pre))


class _GatedMLPTangents(torch.autograd.Function):
    """f (N, D), tr(∂f/∂z) (N,), ‖∂f/∂z‖_F² (N,) of a ConcatSquash MLP at one time t (0-dim).

    Each layer y = (W x + c) ⊙ g + b t with g = sigmoid(a t + a0) is first folded into an ordinary
    affine map x (Wᵀ ⊙ g) + (c ⊙ g + b t); the gate/bias vectors of all layers come concatenated
    (``ConcatSquashField.packed``), so the fold is a few kernels for the whole MLP. Forward-mode:
    rows 1..D of a (D+1, N, width) buffer carry ∂h/∂z_i next to h in row 0, so each hidden layer
    is one (D+1)N-row matrix product. The
    backward pass is written out by hand (one autograd node instead of ~80 small ones; on a 2-core
    CPU the per-op cost, not the FLOPs, dominates at batch 512), and it is what the adjoint's VJP of
    the CNF dynamics costs. First-order only (``once_differentiable``): nothing here needs second
    derivatives. Checked against autograd in tests/flows/test_cnf_forward_trace.py.
    """

    @staticmethod
    def forward(ctx, nonlinearity: str, frobenius: bool, t: Tensor, z: Tensor, *packed: Tensor):
        f, div, frob, saved = tangents_forward(nonlinearity, frobenius, t, z, *packed)
        ctx.set_materialize_grads(False)  # unused outputs (often ‖J‖_F²) get None, not zeros
        ctx.meta = saved[:2]
        ctx.save_for_backward(*saved[2])
        return f, div, frob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_f: Tensor | None, g_div: Tensor | None, g_frob: Tensor | None):
        return (None, None, *tangents_backward((*ctx.meta, ctx.saved_tensors), g_f, g_div, g_frob))


def tangents_forward(nonlinearity: str, frobenius: bool, t: Tensor, z: Tensor, a: Tensor, a0: Tensor,
                     b_t: Tensor, c: Tensor, *weights: Tensor):
    """The forward pass of ``_GatedMLPTangents`` without autograd: (f, div, frob or None, saved),
    ``saved`` being what :func:`tangents_backward` needs. Arguments as ``ConcatSquashField.packed``."""
    # y = (W x + c) ⊙ sigmoid(a t + a0) + b t per layer; a, a0, b_t, c: all layers' (Σ width,)
    # vectors, weights: W_l (out, in). Fold the gate into W_l^T and the bias.
    gate_all = torch.sigmoid(torch.addcmul(a0, a, t))
    sizes = [w.shape[0] for w in weights]
    gates = gate_all.split(sizes)
    bs = torch.addcmul(b_t * t, c, gate_all).split(sizes)
    ws = [w.t() * g for w, g in zip(weights, gates)]
    n_layers = len(weights)
    n, d = z.shape
    tanh = nonlinearity == "tanh"
    xs, slopes, tangent_pres = [z], [], []
    x = None
    for i in range(n_layers):
        w, b = ws[i], bs[i]
        if i == n_layers - 1:
            # D outputs: a skinny product, much faster (MKL) as Wᵀ Xᵀ -> (D, D+1, N)
            pre = torch.mm(w.t(), x.view(-1, x.shape[-1]).t()).view(w.shape[1], d + 1, n)
            f = pre[:, 0].t() + b
            jac = pre[:, 1:]  # (D, D, N): jac[k, i, n] = ∂f_k/∂z_i at sample n
            div = jac.diagonal(dim1=0, dim2=1).sum(dim=1)
            frob = jac.pow(2).sum(dim=(0, 1)) if frobenius else None
            saved = (*xs, *slopes, *tangent_pres, jac, *ws, t, gate_all, a, b_t, c, *weights)
            return f, div, frob, (nonlinearity, sizes, saved)
        if i == 0:
            pre_h = torch.addmm(b, z, w)  # (N, width)
            pre_t = w.unsqueeze(1)  # (D, 1, width): tangent of e_i is row i of W_1
        else:
            pre = torch.mm(x.view(-1, x.shape[-1]), w).view(d + 1, n, -1)
            pre_h, pre_t = pre[0], pre[1:]
            pre_h.add_(b)
        x = z.new_empty(d + 1, n, w.shape[1])
        if tanh:
            h = torch.tanh(pre_h, out=x[0])
            slope = torch.addcmul(_one(h), h, h, value=-1.0)  # 1 - h², one kernel
        else:
            x[0].copy_(torch.nn.functional.softplus(pre_h))
            slope = torch.where(pre_h > 20.0, 1.0, torch.sigmoid(pre_h))
        torch.mul(pre_t, slope, out=x[1:])
        xs.append(x)
        slopes.append(slope)
        tangent_pres.append(pre_t)
    raise AssertionError("unreachable")


def tangents_backward(saved, g_f: Tensor | None, g_div: Tensor | None, g_frob: Tensor | None):
    """Gradients (t, z, *packed) of ⟨g_f, f⟩ + ⟨g_div, div⟩ + ⟨g_frob, frob⟩ from
    :func:`tangents_forward`'s ``saved``; None cotangents count as zero."""
    nonlinearity, sizes, saved = saved
    n_layers = len(sizes)
    weights = saved[-n_layers:]
    t, gate_all, a, b_t, c = saved[-n_layers - 5 : -n_layers]
    saved = saved[: -n_layers - 5]
    n_hidden = (len(saved) - 2) // 4  # xs: n_hidden+1, slopes/tangent_pres: n_hidden, J, ws: n_hidden+1
    xs = saved[: n_hidden + 1]
    slopes = saved[n_hidden + 1 : 2 * n_hidden + 1]
    tangent_pres = saved[2 * n_hidden + 1 : 3 * n_hidden + 1]
    jac = saved[3 * n_hidden + 1]  # (D, D, N): jac[k, i, n] = ∂f_k/∂z_i
    ws = saved[3 * n_hidden + 2 :]
    z = xs[0]
    n, d = z.shape
    tanh = nonlinearity == "tanh"
    # gradient wrt the last layer's (transposed) pre-activations (D, D+1, N): f, J e_1..J e_D
    g_last = z.new_empty(d, d + 1, n)
    if g_f is not None:
        g_last[:, 0] = g_f.t()
    else:
        g_last[:, 0] = 0.0
    if g_frob is not None:
        torch.mul(jac, 2.0 * g_frob, out=g_last[:, 1:])
    else:
        g_last[:, 1:] = 0.0
    if g_div is not None:
        g_last[:, 1:].diagonal(dim1=0, dim2=1).add_(g_div.unsqueeze(1))
    g_ws, g_bs = [None] * len(ws), [None] * len(ws)
    last = len(ws) - 1
    x, w = xs[last], ws[last]
    g_last = g_last.view(d, -1)
    g_ws[last] = torch.mm(g_last, x.view(-1, x.shape[-1])).t()
    g_bs[last] = g_last[:, :n].sum(dim=1)
    g_x = torch.mm(g_last.t(), w.t()).view(d + 1, n, -1)
    for i in range(last, 0, -1):
        if i < last:
            w, x = ws[i], xs[i]
            g_bs[i] = g_pre[0].sum(dim=0)
            g_ws[i] = torch.mm(x.view(-1, x.shape[-1]).t(), g_pre.view(-1, g_pre.shape[-1]))
            g_x = torch.mm(g_pre.view(-1, g_pre.shape[-1]), w.t()).view(d + 1, n, -1)
        # through h' = σ(pre_h), t' = pre_t ⊙ σ'(pre_h)
        slope, pre_t = slopes[i - 1], tangent_pres[i - 1]
        g_h, g_t = g_x[0], g_x[1:]
        g_pre = torch.empty_like(g_x)
        torch.mul(g_t, slope, out=g_pre[1:])
        g_slope = torch.mul(g_t[0], pre_t[0])  # Σ_i g_t[i] ⊙ pre_t[i]: (N, width)
        for j in range(1, d):
            g_slope.addcmul_(g_t[j], pre_t[j])
        if i == 1:  # pre_t of layer 1 is W_1 broadcast: its gradient is Σ_n g_t ⊙ σ'
            g_pre_t_w1 = g_pre[1:].sum(dim=1)
        if tanh:  # σ' = 1 - h², σ'' = -2 h σ'
            torch.addcmul(g_h, x[0], g_slope, value=-2.0, out=g_pre[0])
        else:  # σ' = sigmoid, σ'' = σ'(1 - σ') (0 above softplus' threshold, where σ' = 1)
            torch.addcmul(g_h, g_slope, 1.0 - slope, out=g_pre[0])
        g_pre[0].mul_(slope)
    # first layer: pre_h = z W_1 + b_1 and pre_t[i] = W_1[i] (broadcast over N)
    g_pre_h = g_pre[0]
    g_bs[0] = g_pre_h.sum(dim=0)
    g_ws[0] = torch.addmm(g_pre_t_w1, z.t(), g_pre_h)
    g_z = torch.mm(ws[0], g_pre_h.t()).t()
    # through the gate folding W_l^T ⊙ g, c ⊙ g + b t with g = sigmoid(a t + a0), all layers at once
    g_b_all = torch.cat(g_bs)
    g_gate = torch.cat([(g_w * w.t()).sum(dim=0) for g_w, w in zip(g_ws, weights)]).addcmul_(g_b_all, c)
    g_gate_pre = g_gate.mul_(torch.addcmul(gate_all, gate_all, gate_all, value=-1.0))  # σ' = σ - σ²
    gates = gate_all.split(sizes)
    g_weights = [(g_w * g).t() for g_w, g in zip(g_ws, gates)]
    g_t = torch.dot(g_gate_pre, a) + torch.dot(g_b_all, b_t)
    return (g_t, g_z, g_gate_pre * t, g_gate_pre, g_b_all * t, g_b_all * gate_all, *g_weights)


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
        self.nonlinearity = nonlinearity

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h

    fused_tangents = True  # the hand-written one-node path (one time for the batch); else autograd ops

    def packed(self) -> tuple[Tensor, ...]:
        """The parameters as the fused path takes them: (a, a0, b, c, W_1, ..., W_L) with a, a0, b, c
        the gate weights, gate biases, time-bias weights and linear biases of all layers
        concatenated ((Σ widths,) each) and W_l (out, in). Differentiable: gradients reach the
        layers through the concatenation. A solve computes it once and passes it to every
        ``jacobian_trace`` call (``packed=``), so the per-evaluation graph has a few large nodes.
        """
        ls = self.layers
        return (torch.cat([layer.hyper_gate.weight.reshape(-1) for layer in ls]),
                torch.cat([layer.hyper_gate.bias for layer in ls]),
                torch.cat([layer.hyper_bias.weight.reshape(-1) for layer in ls]),
                torch.cat([layer.linear.bias for layer in ls]),
                *[layer.linear.weight for layer in ls])

    def jacobian_trace(self, t: Tensor, z: Tensor, *, frobenius: bool = False,
                       packed: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """f, tr(∂f/∂z) and optionally ‖∂f/∂z‖_F² in one forward pass (forward-mode, exact).

        The D tangents J e_1..J e_D ride along with f through the MLP: a layer's pre-activation
        p = (W h + c) ⊙ g(t) + b(t) has tangent (W ḣ) ⊙ g(t), the nonlinearity multiplies by σ'(p).
        The first layer's tangent of e_i is just column i of W. For D = 2 and 64-wide layers this is
        about 3 forward passes, and differentiating it (training, the adjoint's VJP) is one ordinary
        backward pass instead of the double backward through D autograd VJPs. With one time for the
        whole batch (joint stepping) the gates are folded into the weights and the MLP runs as one
        hand-differentiated autograd node (``_GatedMLPTangents``; ``fused_tangents = False`` selects
        plain autograd ops, as per-sample time vectors always do).

        Args:
            t: 0-dim time, or (N,) per-sample times.  z: (N, D).
            frobenius: also return ‖∂f/∂z‖_F² (RNODE's Jacobian norm, Finlay et al. 2020 eq. 9).
            packed: ``self.packed()`` computed once per solve (else per call); used with a 0-dim t.
        Returns:
            (f (N, D), tr ∂f/∂z (N,), ‖∂f/∂z‖_F² (N,) or None); differentiable wrt z, t, parameters.
        """
        tt = _time_column(t, z)
        if tt.shape[0] == 1 and len(self.layers) > 1 and self.fused_tangents:
            # one time for the whole batch: fold the gate into the layer, W_l^T σ(a t + a0) and
            # c ⊙ σ(a t + a0) + b t, then one fused node for the MLP and its tangents
            return _GatedMLPTangents.apply(self.nonlinearity, frobenius, tt.reshape(()), z,
                                           *(packed if packed is not None else self.packed()))
        last = len(self.layers) - 1
        h, tangent = z, None  # tangent: (D, N, width), tangent[i] = ∂h/∂z_i
        for i, layer in enumerate(self.layers):
            gate = torch.sigmoid(layer.hyper_gate(tt))  # (1 or N, width)
            weight = layer.linear.weight
            if gate.shape[0] == 1:
                # one time for the whole batch: fold the gate into W and c (an (in, width) product
                # instead of two (N, width)-sized ones, forward and backward)
                w_gated = weight.t() * gate
                pre = torch.addmm(torch.addcmul(layer.hyper_bias(tt)[0], layer.linear.bias, gate[0]), h, w_gated)
                tangent_pre = w_gated.unsqueeze(1) if tangent is None else torch.matmul(tangent, w_gated)
            else:
                pre = torch.addmm(layer.linear.bias, h, weight.t()) * gate + layer.hyper_bias(tt)
                if tangent is None:
                    tangent_pre = weight.t().unsqueeze(1) * gate  # (D, N, width)
                else:
                    tangent_pre = torch.matmul(tangent, weight.t()) * gate
            if i == last:
                # tangent_pre[i, n, k] = ∂f_k/∂z_i at sample n
                div = tangent_pre.diagonal(dim1=0, dim2=2).sum(dim=1)
                if div.shape[0] != z.shape[0]:  # a 1-layer field: the Jacobian is the same for all
                    div = div.expand(z.shape[0])
                frob = None
                if frobenius:
                    frob = tangent_pre.pow(2).sum(dim=(0, 2)).expand(z.shape[0])
                return pre, div, frob
            h, slope = _act_with_derivative(self.nonlinearity, pre)
            tangent = tangent_pre * slope
        raise AssertionError("unreachable: a ConcatSquashField has at least one layer")


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
        """(w, u, b) at time t; u already gated. A scalar t gives (M, D), (M, D), (M,); a per-sample
        t of shape (N,) (``step_control="per_sample"``) gives one set per row: (N, M, D), (N, M, D), (N, M)."""
        tt = _time_column(t, like)
        out = self.hypernet(tt)  # (1 or N, M(2D + 2))
        m, d = self.width, self.dim
        w = out[:, : m * d].reshape(-1, m, d)
        u = out[:, m * d : 2 * m * d].reshape(-1, m, d)
        b = out[:, 2 * m * d : 2 * m * d + m]
        gate = torch.sigmoid(out[:, 2 * m * d + m :])
        u = u * gate[..., None]
        if tt.shape[0] == 1:
            return w[0], u[0], b[0]
        return w, u, b

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        w, u, b = self.parameters_at(t, z)
        if w.dim() == 2:
            return torch.tanh(z @ w.T + b) @ u
        return torch.einsum("nm,nmd->nd", torch.tanh(torch.einsum("nd,nmd->nm", z, w) + b), u)

    def analytic_divergence(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f (N, D), tr ∂f/∂z (N,), ‖∂f/∂z‖_F² (N,)) in closed form; t 0-dim or (N,)."""
        w, u, b = self.parameters_at(t, z)
        if w.dim() == 2:
            h = torch.tanh(z @ w.T + b)  # (N, M)
            dh = 1.0 - h * h
            f = h @ u
            div = dh @ (u * w).sum(dim=1)
            gram = (u @ u.T) * (w @ w.T)  # (M, M)
            frob = ((dh @ gram) * dh).sum(dim=1)
            return f, div, frob
        h = torch.tanh(torch.einsum("nd,nmd->nm", z, w) + b)  # per-row units
        dh = 1.0 - h * h
        f = torch.einsum("nm,nmd->nd", h, u)
        div = (dh * (u * w).sum(dim=2)).sum(dim=1)
        gram = (u @ u.transpose(1, 2)) * (w @ w.transpose(1, 2))  # (N, M, M)
        frob = torch.einsum("nm,nmk,nk->n", dh, gram, dh)
        return f, div, frob
