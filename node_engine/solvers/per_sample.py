"""Independent per-sample step control: every batch element has its own time, step size and
accept/reject decision (``odeint(..., options=dict(step_control="per_sample"))``).

Why: with one step size for the whole batch (joint stepping, torchdiffeq's only mode) the batch
takes the union of every sample's hard spots, and a sample's answer depends on which other samples
share its batch. Stepping each sample on its own (as torchode, Lienen & Günnemann 2022) makes a
sample's result independent of its batch-mates and cuts the vector-field work to what each sample
needs. Finished samples are removed from the active set (compaction), so they cost nothing.

Layout: dim 0 of ``y0`` (of every member of a tuple ``y0``) is the batch; the rest of a sample's
state is flattened to one row of a (B, D) matrix. Each trial step evaluates the field once per
stage on the active rows only, with a *vector* time ``t`` of shape (B_active,) (sample i at its own
time). The error norm is the per-row mixed RMS (per tuple member, max over members), the
controller the same I/PI controller as the joint loop, applied row-wise. Outputs at the requested
times come from each row's dense output (the method's continuous extension) in the step that
crosses them. One host synchronisation per trial step (a packed vector of counters), plus one per
compaction.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import MaxNumStepsError, NonFiniteStateError, StepSizeUnderflowError
from .tableau import ButcherTableau

__all__ = ["solve_per_sample", "PER_SAMPLE_METHODS"]

PER_SAMPLE_METHODS = ("dopri5", "tsit5", "bosh3")  # adaptive, dense output without extra stages
MAX_NONFINITE_RETRIES = 12


class BatchLayout:
    """Tensor or tuple state whose members share batch dim 0 -> (B, D) rows and back."""

    def __init__(self, y0):
        self.is_tuple = isinstance(y0, (tuple, list))
        members = tuple(y0) if self.is_tuple else (y0,)
        if not members:
            raise ValueError("y0 is an empty tuple; give at least one tensor")
        for m in members:
            if not isinstance(m, torch.Tensor) or not m.is_floating_point():
                raise TypeError("y0 must be a floating tensor or a tuple of floating tensors")
            if m.dim() < 1:
                raise ValueError("step_control='per_sample' needs a batch dimension 0 in y0 (got a 0-d tensor)")
        self.batch = members[0].shape[0]
        if any(m.shape[0] != self.batch for m in members):
            raise ValueError(
                "step_control='per_sample': every member of a tuple y0 must share batch dim 0; got "
                f"{[tuple(m.shape) for m in members]}")
        if self.batch < 1:
            raise ValueError("y0 has an empty batch")
        self.dtype, self.device = members[0].dtype, members[0].device
        if any(m.dtype != self.dtype or m.device != self.device for m in members):
            raise ValueError("all members of a tuple y0 need one dtype and device")
        self.tails = [tuple(m.shape[1:]) for m in members]
        self.sizes = [math.prod(s) for s in self.tails]
        self.width = sum(self.sizes)

        # how to cut a (n, D) row block into members: (start, stop, tail) without copies
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self.cuts = [(a, b_, tail) for a, b_, tail in zip(offs[:-1], offs[1:], self.tails)]

    def flatten(self, y) -> torch.Tensor:
        if not self.is_tuple:
            return y.reshape(self.batch, -1)
        return torch.cat([m.reshape(m.shape[0], -1) for m in y], dim=1)

    def unflatten(self, z: torch.Tensor):
        """(..., n, D) -> user layout with leading dims (..., n)."""
        lead = z.shape[:-1]
        if not self.is_tuple:
            return z.reshape(*lead, *self.tails[0])
        parts = torch.split(z, self.sizes, dim=-1)
        return tuple(p.reshape(*lead, *s) for p, s in zip(parts, self.tails))

    def rows(self, z: torch.Tensor):
        """(n, D) -> the user's (n, ...) layout, views where possible (the hot path)."""
        if not self.is_tuple:
            return z.view(z.shape[0], *self.tails[0]) if z.is_contiguous() else z.reshape(z.shape[0], *self.tails[0])
        out = []
        for a, b_, tail in self.cuts:
            if not tail:
                out.append(z[:, a])
            elif len(tail) == 1:
                out.append(z[:, a:b_])
            else:
                out.append(z[:, a:b_].reshape(z.shape[0], *tail))
        return tuple(out)


class _Field:
    """func(t_vec, y_active) on (Ba, D) rows, with shape checks and work counting."""

    def __init__(self, func, layout: BatchLayout, t_dtype):
        self.func, self.layout, self.t_dtype = func, layout, t_dtype
        self.nfe = 0
        self.sample_evaluations = 0
        self.tails = [torch.Size(tl) for tl in layout.tails]

    def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``t`` (n,) already in the time dtype, ``z`` (n, D) -> (n, D)."""
        lay = self.layout
        n = z.shape[0]
        self.nfe += 1
        self.sample_evaluations += n
        out = self.func(t, lay.rows(z))
        if not lay.is_tuple:
            if not isinstance(out, torch.Tensor) or out.shape[0] != n or out.shape[1:] != self.tails[0] \
                    or out.dtype != lay.dtype:
                raise ValueError(
                    f"func(t, y) must return dy/dt shaped like y {(n, *lay.tails[0])} with dtype {lay.dtype}; got "
                    f"{getattr(out, 'shape', type(out).__name__)}")
            return out.reshape(n, -1)
        if not isinstance(out, (tuple, list)) or len(out) != len(lay.tails):
            raise ValueError(f"func must return a tuple of {len(lay.tails)} tensors shaped like y (tuple state)")
        flat = []
        for o, tl in zip(out, self.tails):
            if not isinstance(o, torch.Tensor) or o.shape[0] != n or o.shape[1:] != tl or o.dtype != lay.dtype:
                raise ValueError(f"func(t, y) returned a member of shape {getattr(o, 'shape', None)}; "
                                 f"expected {(n, *tl)} and dtype {lay.dtype}")
            flat.append(o.unsqueeze(1) if not tl else (o if len(tl) == 1 else o.reshape(n, -1)))
        return torch.cat(flat, dim=1)


class _RowNorm:
    """Per-row mixed RMS of err / (atol + rtol max(|y0|, |y1|)): (Ba,)."""

    def __init__(self, rtol, atol, sizes: list[int]):
        self.rtol, self.atol = rtol, atol
        self.sizes = sizes if len(sizes) > 1 else None

    def scale(self, y0, y1=None):
        m = y0.abs() if y1 is None else torch.maximum(y0.abs(), y1.abs())
        if isinstance(self.rtol, torch.Tensor) or isinstance(self.atol, torch.Tensor):
            return m * self.rtol + self.atol
        return torch.add(m.mul_(self.rtol), self.atol) if y1 is not None else m * self.rtol + self.atol

    def rms(self, v: torch.Tensor) -> torch.Tensor:
        if self.sizes is None:
            return v.square().mean(dim=1).sqrt()
        return torch.stack([p.square().mean(dim=1) for p in torch.split(v, self.sizes, dim=1)], 1).amax(1).sqrt()


def _row_tolerance(tol, layout: BatchLayout, name: str):
    def one(x):
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                raise ValueError(f"step_control='per_sample' takes {name} as a float or one float per tuple member")
            x = float(x)
        x = float(x)
        if not (x >= 0 and math.isfinite(x)):
            raise ValueError(f"{name} must be finite and >= 0, got {x}")
        return x

    if isinstance(tol, (tuple, list)):
        if not layout.is_tuple or len(tol) != len(layout.sizes):
            raise ValueError(f"{name} as a tuple needs one entry per member of y0")
        vals = [one(x) for x in tol]
        if len(set(vals)) == 1:
            return vals[0]
        return torch.cat([torch.full((n,), v, dtype=layout.dtype, device=layout.device)
                          for v, n in zip(vals, layout.sizes)])
    return one(tol)


def solve_per_sample(func, y0, times: list[float], t_dtype, tab: ButcherTableau, rtol, atol, options: dict,
                     stats=None):
    """Solve with one step size per batch row; returns the user layout with leading (T, B).

    Args:
        func: ``func(t, y)`` with t a (B_active,) tensor (each row's own time, dtype of ``t``) and
            y the active rows of the state (B_active, ...) (tuple for tuple y0); returns dy/dt
            shaped like y. Rows are independent: func must not mix samples.
        y0: (B, ...) tensor or tuple of tensors sharing dim 0.
        times: T strictly monotonic floats; tab: an adaptive tableau with dense output and no
            extra stages (dopri5, tsit5, bosh3).
        rtol, atol: floats, or one float per tuple member.
        options: first_step, max_num_steps (trial steps per sample), safety, ifactor, dfactor, beta.
        stats: SolverStats or None; nfe_forward counts batched calls, sample_evaluations counts
            rows evaluated (the work), steps are counted per sample.
    Raises:
        ValueError for unsupported settings; StepSizeUnderflowError, MaxNumStepsError,
        NonFiniteStateError naming the sample (batch index) and time.
    """
    if tab.name not in PER_SAMPLE_METHODS:
        raise ValueError(f"step_control='per_sample' supports methods {', '.join(PER_SAMPLE_METHODS)}; got {tab.name!r}")
    for k in ("step_t", "jump_t"):
        if options.get(k) is not None:
            raise ValueError(f"options[{k!r}] is not supported with step_control='per_sample'")
    layout = BatchLayout(y0)
    vf = _Field(func, layout, t_dtype)
    norm = _RowNorm(_row_tolerance(rtol, layout, "rtol"), _row_tolerance(atol, layout, "atol"), layout.sizes)
    if isinstance(norm.rtol, float) and isinstance(norm.atol, float) and norm.rtol == 0 and norm.atol == 0:
        raise ValueError("rtol and atol cannot both be 0 for an adaptive method")
    try:
        out = _integrate(vf, layout.flatten(y0), times, tab, norm, options, stats)
    finally:
        if stats is not None:
            stats.nfe_forward += vf.nfe
            stats.sample_evaluations += vf.sample_evaluations
    return layout.unflatten(out)


def _integrate(vf: _Field, z0: torch.Tensor, times: list[float], tab: ButcherTableau, norm: _RowNorm,
               o: dict, stats) -> torch.Tensor:
    B, D = z0.shape
    T = len(times)
    dev, dt = z0.device, z0.dtype
    f64 = torch.float64
    # with grad mode on, func's parameters may require grad even when y0 does not: build a graph
    # (fresh buffers, no out= kernels); under no_grad reuse preallocated buffers
    grad = torch.is_grad_enabled()
    out = z0.new_zeros(T + 1, B, D)  # row T: scratch for rows that output nothing this step
    out[0] = z0
    if T == 1:
        return out[:1]
    t0, t_end = times[0], times[-1]
    d = 1.0 if t_end > t0 else -1.0
    safety = float(o.get("safety", 0.9))
    ifactor = float(o.get("ifactor", 10.0))
    dfactor = float(o.get("dfactor", 0.2))
    beta = float(o.get("beta", 0.0))
    if not (0 < safety <= 1 and ifactor >= 1 and 0 < dfactor <= 1 and 0 <= beta < 0.2):
        raise ValueError("bad controller options (need 0<safety<=1, ifactor>=1, 0<dfactor<=1, 0<=beta<0.2)")
    k_ord = tab.control_order + 1
    alpha = 1.0 / k_ord - 0.75 * beta
    mns = o.get("max_num_steps", 100_000)
    if not (isinstance(mns, int) and mns > 0):
        raise ValueError(f"options['max_num_steps'] must be a positive int, got {mns!r}")

    s = tab.stages
    A = torch.zeros(s, s, dtype=dt)  # filled on the host, moved once
    for i, row in enumerate(tab.a):
        if row:
            A[i, : len(row)] = torch.tensor(row, dtype=dt)
    A = A.to(dev)
    b_err = torch.tensor(tab.b_err, dtype=dt, device=dev).unsqueeze(0)
    a_rows = [A[i, :i].unsqueeze(0) for i in range(s)]
    P = torch.as_tensor(np.array(tab.dense), dtype=dt, device=dev)  # (s, deg)
    deg = P.shape[1]
    c_t = torch.tensor(tab.c, dtype=f64, device=dev)
    c_one = [ci == 1.0 for ci in tab.c]  # stages at the step's end: evaluated at t_new exactly
    times_t = torch.tensor(times, dtype=f64, device=dev)
    key = times_t * d  # increasing, for searchsorted
    t_end_t = torch.tensor(t_end, dtype=f64, device=dev)
    rtol_s, atol_s = norm.rtol, norm.atol

    gid = torch.arange(B, device=dev)
    t = torch.full((B,), t0, dtype=f64, device=dev)
    z = z0 if grad else z0.detach().contiguous()
    t_dtype_f = vf.t_dtype
    k1 = vf(t.to(t_dtype_f), z)
    if not bool(torch.isfinite(z.detach()).all() & torch.isfinite(k1.detach()).all()):
        raise NonFiniteStateError(f"the initial state or f(t0, y0) contains NaN/inf at t={t0:g}", t=t0)
    span = abs(t_end - t0)
    if o.get("first_step") is not None:
        fs = float(o["first_step"])
        if not (fs != 0 and math.isfinite(fs)):
            raise ValueError(f"options['first_step'] must be a nonzero finite number, got {fs}")
        h = torch.full((B,), min(abs(fs), span), dtype=f64, device=dev)
    else:
        h = _initial_step(vf, t.to(t_dtype_f), z, k1, d, span, tab.control_order, norm)
    prev = torch.full((B,), 1e-4, dtype=f64, device=dev)
    i_out = torch.ones(B, dtype=torch.long, device=dev)
    n_bad = None  # consecutive non-finite trials per row, tracked only once one happened
    n_trials = accepted_total = rejected_total = 0
    eps4 = 4 * 2.0**-52
    last_h = float("nan")
    Tidx = torch.full((1,), T, dtype=torch.long, device=dev)
    exp_acc, exp_rej = -alpha, -1.0 / k_ord

    same_t = vf.t_dtype == f64
    same_r = dt == f64
    t_max = max(abs(t0), abs(t_end))
    buf_rows = -1  # batch size the stage buffers below were made for (no-grad mode)
    while True:
        Ba = z.shape[0]
        n_trials += 1
        if d > 0:
            t_new = torch.where(t_end_t - t <= 1.01 * h, t_end_t, t + h)
        else:
            t_new = torch.where(t - t_end_t <= 1.01 * h, t_end_t, t - h)
        hs = t_new - t  # signed, float64
        hcol = (hs if same_r else hs.to(dt)).unsqueeze(1)
        t_new_c = t_new if same_t else t_new.to(vf.t_dtype)
        zf = z.reshape(1, Ba * D)
        if grad:
            # fresh buffers every step, so autograd can record through them
            tst = torch.addr(t.unsqueeze(0), c_t, hs).to(vf.t_dtype)
            K = z.new_empty(s, Ba, D)
            Kf = K.view(s, Ba * D)
            K[0] = k1 * hcol
            for i in range(1, s):
                yi = torch.addmm(zf, a_rows[i], Kf[:i]).view(Ba, D)
                fi = vf(t_new_c if c_one[i] else tst[i], yi)
                K[i] = fi * hcol
        else:
            if Ba != buf_rows:
                # K[i] = h f_i (so each stage input is one addmm), stage inputs and stage times:
                # made once per active-set size, with their views
                buf_rows = Ba
                K = z.new_empty(s, Ba, D)
                Kf = K.view(s, Ba * D)
                K_rows = [K[i] for i in range(s)]
                K_pre = [Kf[:i] for i in range(s)]
                Y = z.new_empty(s, Ba * D)
                Y_out = [Y[i:i + 1] for i in range(s)]
                Y_rows = [Y[i].view(Ba, D) for i in range(s)]
                TS = torch.empty(s, Ba, dtype=f64, device=dev)
                TS_rows = [TS[i] for i in range(s)]
            torch.addr(t.unsqueeze(0), c_t, hs, out=TS)
            tst = TS_rows if same_t else list(TS.to(vf.t_dtype))
            torch.mul(k1, hcol, out=K_rows[0])
            for i in range(1, s - 1):
                torch.addmm(zf, a_rows[i], K_pre[i], out=Y_out[i])
                torch.mul(vf(t_new_c if c_one[i] else tst[i], Y_rows[i]), hcol, out=K_rows[i])
            yi = torch.addmm(zf, a_rows[s - 1], K_pre[s - 1]).view(Ba, D)  # the new state: its own tensor
            fi = vf(t_new_c, yi)
            torch.mul(fi, hcol, out=K_rows[s - 1])
        z_new, f_last = yi, fi  # FSAL: the last stage's input is the new state, its value f(t_new)
        with torch.no_grad():
            err = torch.mm(b_err, Kf.detach() if grad else Kf).view(Ba, D)
            zd, znd = (z.detach(), z_new.detach()) if grad else (z, z_new)
            sc = torch.maximum(zd.abs(), znd.abs())
            sc = sc.mul_(rtol_s).add_(atol_s)
            e2 = err.div_(sc).square_()
            if norm.sizes is None:
                ratio = e2.mean(dim=1)
            else:
                ratio = torch.stack([p.mean(dim=1) for p in torch.split(e2, norm.sizes, dim=1)], 1).amax(1)
            ratio = ratio.sqrt_() if same_r else ratio.sqrt_().to(f64)
            acc = ratio <= 1.0
            # outputs crossed by accepted rows: times in (t, t_new], counted by searchsorted
            ncross = (torch.searchsorted(key, t_new if d > 0 else -t_new, right=True) - i_out).mul_(acc)
            hs_abs = hs.abs()
            # counters in one host sync: accepted, max outputs crossed, finitely rejected, min |h|
            i_out_new = i_out + ncross
            done = i_out_new == T  # rows that wrote their last output (landed on t_end)
            flags = torch.stack([acc.sum(dtype=f64), ncross.max().to(f64), (ratio > 1.0).sum(dtype=f64),
                                 hs_abs.min(), done.sum(dtype=f64)]).tolist()
        n_acc, max_cross, n_rej, n_done = int(flags[0]), int(flags[1]), int(flags[2]), int(flags[4])
        n_nonfinite = Ba - n_acc - n_rej
        any_tiny = False
        if flags[3] <= eps4 * t_max:  # only then can a row's step have underflowed: check exactly
            any_tiny = bool((hs_abs <= eps4 * torch.maximum(t.abs(), t_new.abs())).any())

        if n_nonfinite or n_bad is not None:
            finite = torch.isfinite(ratio)
            n_bad = torch.where(finite, 0, (n_bad if n_bad is not None else torch.zeros_like(i_out)) + 1)
            if n_nonfinite == 0:
                n_bad = None
        too_bad = n_bad is not None and bool((n_bad > MAX_NONFINITE_RETRIES).any())
        if any_tiny or too_bad or n_trials > mns:
            tiny_rows = hs.abs() <= eps4 * torch.maximum(t.abs(), t_new.abs())
            _raise(any_tiny, too_bad, tiny_rows, n_bad, n_trials, gid, t, hs, mns)
        accepted_total += n_acc
        rejected_total += Ba - n_acc
        # dense output for rows that crossed output times (rounds: max outputs inside one step)
        for r in range(max_cross):
            idx_t = i_out + r
            th = ((times_t[idx_t.clamp(max=T - 1)] - t) / hs).to(dt)
            W = torch.zeros(Ba, s, dtype=dt, device=dev)
            for kk in range(deg - 1, -1, -1):  # Horner: b(θ) = θ(p1 + θ(p2 + ...))
                W = (W + P[:, kk]) * th.unsqueeze(1)
            y_out = z + torch.einsum("bj,jbd->bd", W, K)
            y_out = torch.where((th == 1).unsqueeze(1), z_new, y_out)  # exactly on the step's end
            rows = torch.where(ncross > r, idx_t, Tidx)
            if grad:
                out = out.index_put((rows, gid), y_out)
            else:
                out.index_put_((rows, gid), y_out)
        with torch.no_grad():
            if n_acc == Ba:
                fac = (safety * ratio.pow(exp_acc)).clamp_(dfactor, ifactor)
            else:
                fac = torch.where(acc, (safety * ratio.pow(exp_acc)).clamp_(dfactor, ifactor),
                                  (safety * ratio.pow(exp_rej)).clamp_(dfactor, 1.0))
            if beta:
                fac = torch.where(acc, (fac * prev.pow(beta)).clamp_(dfactor, ifactor), fac)
                prev = torch.where(acc, ratio.clamp(min=1e-4), prev)
            if n_nonfinite:
                fac = torch.where(torch.isfinite(ratio), fac, 0.1)
            h = hs.abs().mul_(fac)
        if n_acc == 0:
            continue
        i_out = i_out_new
        if n_acc == Ba:
            t, z, k1 = t_new, z_new, f_last
        else:
            a1 = acc.unsqueeze(1)
            t = torch.where(acc, t_new, t)
            z = torch.where(a1, z_new, z)
            k1 = torch.where(a1, f_last, k1)
        if n_done:
            if stats is not None:
                last_h = hs_abs.max()  # a device tensor: read once, after the loop
            if n_done == Ba:
                break
            # compaction: finished rows leave the active set (one more sync, only on these steps)
            keep = (~done).nonzero().squeeze(1)
            z, t, h, prev, i_out, gid, k1 = (
                x.index_select(0, keep) for x in (z, t, h, prev, i_out, gid, k1))
            if n_bad is not None:
                n_bad = n_bad.index_select(0, keep)
    if stats is not None:
        stats.steps_accepted += accepted_total
        stats.steps_rejected += rejected_total
        stats.last_step_size = float(last_h)
    return out[:T]


def _raise(any_tiny, too_bad, tiny, n_bad, n_trials, gid, t, hs, mns):
    if too_bad:
        i = int((n_bad > MAX_NONFINITE_RETRIES).nonzero()[0, 0])
        raise NonFiniteStateError(
            f"NaN/inf in the state or derivative of sample {int(gid[i])} in {int(n_bad[i])} consecutive trial "
            f"steps from t={float(t[i]):g}", t=float(t[i]))
    if any_tiny:
        i = int(tiny.nonzero()[0, 0])
        raise StepSizeUnderflowError(
            f"step size {abs(float(hs[i])):.3g} of sample {int(gid[i])} underflowed at t={float(t[i]):g} (the problem "
            f"may be stiff or singular there; loosen rtol/atol)", t=float(t[i]))
    i = int(t.argmin()) if t.numel() else 0
    raise MaxNumStepsError(
        f"max_num_steps={mns} trial steps reached by sample {int(gid[i])} at t={float(t[i]):g}; raise "
        f"options['max_num_steps'] or loosen rtol/atol", t=float(t[i]))


def _initial_step(vf, t, z0, f0, d, span, order, norm: _RowNorm) -> torch.Tensor:
    """Hairer's starting step (HNW I §II.4) for every row: (B,) float64 |h|."""
    with torch.no_grad():
        z0d, f0d = z0.detach(), f0.detach()
        sc = norm.scale(z0d)
        d0 = norm.rms(z0d / sc).double()
        d1 = norm.rms(f0d / sc).double()
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
        z1 = z0d + (d * h0).to(z0.dtype).unsqueeze(1) * f0d
        f1 = vf((t + d * h0).to(t.dtype), z1)
        d2 = norm.rms((f1.detach() - f0d) / sc).double() / h0
        dm = torch.maximum(d1, d2)
        h1 = torch.where(dm <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dm).pow(1.0 / (order + 1)))
        h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))
        return torch.where(torch.isfinite(d2), h, h0 * 1e-3)
