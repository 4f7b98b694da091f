"""The solver works on flat states; this module maps the user's state (a tensor of any shape, or a
tuple of tensors as in torchdiffeq) to and from them, and wraps ``func(t, y)`` so it takes the
solver's times and flat states, checks what it returns and counts evaluations.

Two layouts, one class: *joint* (the whole state is one row, a flat (N,) vector; one time and one
step for everything) and *batched* (dim 0 of every member is a batch of B independent rows; each
row is flattened to D = Σ prod(member.shape[1:]) columns, so the state is a (B, D) matrix and every
row gets its own time, step and status).
"""

from __future__ import annotations

import math

import torch

from .rows import to_device

__all__ = ["StateLayout", "VectorField", "RowField"]


class StateLayout:
    """Shapes of the user's state and how they pack into rows.

    Args:
        y0: a tensor (any shape) or a tuple of tensors (same dtype and device).
        batched: dim 0 of every member is the batch (per-sample step control).
    Attributes:
        batch: B (batched) or None (joint).
        shapes: member shapes of one row: the full shapes (joint) or ``shape[1:]`` (batched).
        sizes: elements per member in one row; ``numel`` their sum (N joint, D batched).
    Raises:
        TypeError / ValueError: y0 is not a floating tensor (or tuple of them) with one dtype/device;
        batched members without a common dim 0.
    """

    def __init__(self, y0, *, batched: bool = False):
        self.is_tuple = isinstance(y0, (tuple, list))
        members = tuple(y0) if self.is_tuple else (y0,)
        if not members:
            raise ValueError("y0 is an empty tuple; give at least one tensor")
        for i, m in enumerate(members):
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"y0{'[%d]' % i if self.is_tuple else ''} must be a torch.Tensor, got {type(m).__name__}")
            if not m.is_floating_point():
                raise TypeError(f"y0 must be floating point (float32/float64), got {m.dtype}")
        self.dtype = members[0].dtype
        self.device = members[0].device
        for m in members[1:]:
            if m.dtype != self.dtype or m.device != self.device:
                raise ValueError(
                    f"all members of a tuple y0 need one dtype and device; got {m.dtype}/{m.device}"
                    f" and {self.dtype}/{self.device}"
                )
        self.batch = None
        if batched:
            if any(m.dim() < 1 for m in members):
                raise ValueError("step_control='per_sample' needs a batch dimension 0 in y0 (got a 0-d tensor)")
            self.batch = members[0].shape[0]
            if any(m.shape[0] != self.batch for m in members):
                raise ValueError("step_control='per_sample': every member of a tuple y0 must share batch dim 0; "
                                 f"got {[tuple(m.shape) for m in members]}")
            if self.batch < 1:
                raise ValueError("y0 has an empty batch")
        self.shapes = [tuple(m.shape[1:] if batched else m.shape) for m in members]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self._cuts = list(zip(offs[:-1], offs[1:], self.shapes))

    def flatten(self, y) -> torch.Tensor:
        """User state -> (N,) joint or (B, D) batched (a view when y is one contiguous tensor)."""
        lead = () if self.batch is None else (self.batch,)
        if not self.is_tuple:
            return y.reshape(*lead, -1)
        return torch.cat([m.reshape(*lead, -1) for m in y], dim=-1)

    def unflatten(self, z: torch.Tensor):
        """(..., N or D) -> the user's layout with the same leading dims."""
        lead = tuple(z.shape[:-1])
        if not self.is_tuple:
            return z.reshape(lead + tuple(self.shapes[0]))
        parts = torch.split(z, self.sizes, dim=-1)
        return tuple(p.reshape(lead + tuple(s)) for p, s in zip(parts, self.shapes))

    def rows(self, z: torch.Tensor):
        """(n, D) -> the user's (n, ...) layout, views where possible (the batched hot path)."""
        n = z.shape[0]
        if not self.is_tuple:
            return z.view(n, *self.shapes[0]) if z.is_contiguous() else z.reshape(n, *self.shapes[0])
        out = []
        for a, b, tail in self._cuts:
            if not tail:
                out.append(z[:, a])
            elif len(tail) == 1:
                out.append(z[:, a:b])
            else:
                out.append(z[:, a:b].reshape(n, *tail))
        return tuple(out)

    @property
    def work_shape(self) -> torch.Size:
        """Shape the joint solver hands to the field wrapper: y's shape, or (N,) for a tuple state."""
        return torch.Size(self.shapes[0] if not self.is_tuple else (self.numel,))

    def member_segments(self) -> list[int] | None:
        """Segment lengths (of a row) for the mixed norm, one per tuple member; None for one tensor."""
        return list(self.sizes) if self.is_tuple and len(self.sizes) > 1 else None


class VectorField:
    """``func(t, y)`` as a map (float t, y in ``layout.work_shape``) -> dy/dt in the same shape,
    with shape/dtype checks and NFE counting (joint layout). A single-tensor state passes straight
    through (no copies); a tuple state is unpacked from / packed into one flat vector.

    The time reaches ``func`` as a 0-d tensor of ``t_dtype`` on the state's device, as in
    torchdiffeq. ``nfe`` counts calls, ``sample_evaluations`` rows evaluated (batched layout).
    """

    __slots__ = ("func", "layout", "t_dtype", "device", "nfe", "sample_evaluations", "_single_shape", "work_shape")

    def __init__(self, func, layout: StateLayout, t_dtype: torch.dtype):
        self.func = func
        self.layout = layout
        self.t_dtype = t_dtype
        self.device = layout.device
        self.nfe = 0
        self.sample_evaluations = 0
        self._single_shape = None if layout.is_tuple else torch.Size(layout.shapes[0])
        self.work_shape = layout.work_shape

    def pure(self):
        """``(g, arg)`` with ``g(arg, t, z) = f(t, z)`` without checks or counting, for the compiled
        trial step: t a 0-d tensor (``t_dtype``), z and the result flat (N,). ``g`` captures only
        the layout; the field (``arg``) is an argument, so a compiled step serves every field object
        with the same structure (see ``compile_key`` in :mod:`.compiled_step`)."""
        lay, ws, dtype = self.layout, self.work_shape, self.layout.dtype
        if not lay.is_tuple:
            return (lambda func, t, z: func(t, z.view(ws)).to(dtype).reshape(-1)), self.func
        return (lambda func, t, z: torch.cat([o.to(dtype).reshape(-1) for o in func(t, lay.unflatten(z))])), self.func

    def time(self, t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)

    def at(self, t: float, z: torch.Tensor) -> torch.Tensor:
        """f(t, z) for a flat (N,) state and a float time: (N,)."""
        return self(t, z.view(self.work_shape)).reshape(-1)

    def __call__(self, t, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        lay = self.layout
        # t: a float, or a 0-d tensor of t_dtype already (the RK step makes its stage times at once)
        tt = t if type(t) is torch.Tensor else torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)
        if self._single_shape is not None:
            out = self.func(tt, z)
            if not isinstance(out, torch.Tensor) or out.shape != self._single_shape or out.dtype != lay.dtype:
                out = self._bad_output(out, None, self._single_shape)
            return out
        out = self.func(tt, lay.unflatten(z))
        return self._pack(out, ())

    def _pack(self, out, lead: tuple) -> torch.Tensor:
        lay = self.layout
        if not isinstance(out, (tuple, list)) or len(out) != len(lay.shapes):
            raise ValueError(
                f"func must return a tuple of {len(lay.shapes)} tensors shaped like y (tuple state); "
                f"got {type(out).__name__}"
            )
        out = list(out)
        for i, (o, s) in enumerate(zip(out, lay.shapes)):
            if not isinstance(o, torch.Tensor) or tuple(o.shape) != lead + s or o.dtype != lay.dtype:
                out[i] = self._bad_output(o, i, lead + s)
        return torch.cat([o.reshape(*lead, -1) for o in out], dim=-1)

    def _bad_output(self, out, member: int | None, expected) -> torch.Tensor:
        """``out`` cast to y's dtype when only its floating dtype differs (as torchdiffeq: a float32
        state whose field mixes in float64 times); a wrong shape or type raises."""
        where = "" if member is None else f"[{member}]"
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"func(t, y){where} must return a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) == tuple(expected) and out.is_floating_point():
            return out.to(self.layout.dtype)
        raise ValueError(
            f"func(t, y){where} returned shape {tuple(out.shape)} and dtype {out.dtype}; "
            f"dy/dt must have the shape {tuple(expected)} and dtype {self.layout.dtype} of y"
        )


class RowField(VectorField):
    """The batched layout's wrapper: ``t`` (n,) tensor of each row's own time (``t_dtype``),
    ``z`` (n, D) active rows -> (n, D). ``func`` receives the rows in the user's layout."""

    __slots__ = ()

    def pure(self):
        """As :meth:`VectorField.pure` for rows: t (n,), z (n, D) -> (n, D)."""
        lay, dtype = self.layout, self.layout.dtype

        def f(func, t, z):
            n = z.shape[0]
            out = func(t, lay.rows(z))
            if lay.is_tuple:
                return torch.cat([o.to(dtype).reshape(n, -1) for o in out], dim=-1)
            return out.to(dtype).reshape(n, -1)
        return f, self.func

    def at(self, t, z: torch.Tensor) -> torch.Tensor:
        """f(t, z) for host times (B,) (float64 numpy) and rows z (B, D): (B, D)."""
        return self(to_device(t, self.device, self.t_dtype), z)

    def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        n = z.shape[0]
        self.nfe += 1
        self.sample_evaluations += n
        out = self.func(t, lay.rows(z))
        if lay.is_tuple:
            return self._pack(out, (n,))
        expected = (n, *lay.shapes[0])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected or out.dtype != lay.dtype:
            out = self._bad_output(out, None, expected)
        return out.reshape(n, -1)
