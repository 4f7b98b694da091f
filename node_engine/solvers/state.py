"""The solver works on one flat state vector z of shape (N,); this module maps the user's state
(a tensor of any shape, or a tuple of tensors as in torchdiffeq) to and from it, and wraps
``func(t, y)`` so it takes a float time and a flat vector, checks what it returns and counts NFE.
"""

from __future__ import annotations

import math

import torch

__all__ = ["StateLayout", "VectorField"]


class StateLayout:
    """Shapes of the user's state and how they pack into a flat (N,) vector.

    Args:
        y0: a tensor (any shape) or a tuple of tensors (same dtype and device).
    Raises:
        TypeError / ValueError: y0 is not a floating tensor (or tuple of them) with one dtype/device.
    """

    def __init__(self, y0):
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
        self.shapes = [tuple(m.shape) for m in members]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    def flatten(self, y) -> torch.Tensor:
        """User state -> (N,) (a view when y is a single contiguous tensor)."""
        if not self.is_tuple:
            return y.reshape(-1)
        return torch.cat([m.reshape(-1) for m in y])

    def unflatten(self, z: torch.Tensor):
        """(..., N) -> the user's layout with the same leading dims."""
        lead = z.shape[:-1]
        if not self.is_tuple:
            return z.view(*lead, *self.shapes[0])
        parts = torch.split(z, self.sizes, dim=-1)
        return tuple(p.reshape(tuple(lead) + tuple(s)) for p, s in zip(parts, self.shapes))

    @property
    def work_shape(self) -> torch.Size:
        """Shape the solver hands to the field wrapper: y's shape, or (N,) for a tuple state."""
        return torch.Size(self.shapes[0] if not self.is_tuple else (self.numel,))

    def member_segments(self) -> list[int] | None:
        """Segment lengths for the mixed norm (one per tuple member), None for a single tensor."""
        return list(self.sizes) if self.is_tuple and len(self.sizes) > 1 else None


class VectorField:
    """``func(t, y)`` as a map (float t, y in ``layout.work_shape``) -> dy/dt in the same shape,
    with shape/dtype checks and NFE counting. A single-tensor state passes straight through (no
    copies); a tuple state is unpacked from / packed into one flat vector.

    The time reaches ``func`` as a 0-d tensor of ``t_dtype`` on the state's device, as in
    torchdiffeq. ``nfe`` counts calls.
    """

    __slots__ = ("func", "layout", "t_dtype", "device", "nfe", "_single_shape", "work_shape")

    def __init__(self, func, layout: StateLayout, t_dtype: torch.dtype):
        self.func = func
        self.layout = layout
        self.t_dtype = t_dtype
        self.device = layout.device
        self.nfe = 0
        self._single_shape = None if layout.is_tuple else torch.Size(layout.shapes[0])
        self.work_shape = layout.work_shape

    def time(self, t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)

    def __call__(self, t, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        lay = self.layout
        # t: a float, or a 0-d tensor of t_dtype already (the RK step makes its stage times at once)
        tt = t if type(t) is torch.Tensor else torch.scalar_tensor(t, dtype=self.t_dtype, device=self.device)
        if self._single_shape is not None:
            out = self.func(tt, z)
            if not isinstance(out, torch.Tensor) or out.shape != self._single_shape or out.dtype != lay.dtype:
                self._bad_output(out)
            return out
        out = self.func(tt, lay.unflatten(z))
        if not isinstance(out, (tuple, list)) or len(out) != len(lay.shapes):
            raise ValueError(
                f"func must return a tuple of {len(lay.shapes)} tensors shaped like y (tuple state); "
                f"got {type(out).__name__}"
            )
        for i, (o, s) in enumerate(zip(out, lay.shapes)):
            if not isinstance(o, torch.Tensor) or tuple(o.shape) != s or o.dtype != lay.dtype:
                self._bad_output(o, i)
        return torch.cat([o.reshape(-1) for o in out])

    def _bad_output(self, out, member: int | None = None):
        where = "" if member is None else f"[{member}]"
        expected = self.layout.shapes[member or 0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"func(t, y){where} must return a torch.Tensor, got {type(out).__name__}")
        raise ValueError(
            f"func(t, y){where} returned shape {tuple(out.shape)} and dtype {out.dtype}; "
            f"dy/dt must have the shape {expected} and dtype {self.layout.dtype} of y"
        )
