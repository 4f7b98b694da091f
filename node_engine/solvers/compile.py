"""Optional ``torch.compile`` of a vector field (issue 6, item 5).

The solver loop itself stays in Python (its control flow is data dependent: accept/reject, dense
output, compaction); what compiles well is the field, which is called NFE times per solve with
the same shapes. Compiling fuses its element-wise ops (bias + tanh, the ConcatSquash gate) and
cuts per-op dispatch, which is where small fields spend their time.
"""

from __future__ import annotations

import torch

__all__ = ["compile_field"]


def compile_field(func, *, dynamic: bool | None = None, mode: str | None = None, backend: str = "inductor",
                  fullgraph: bool = False):
    """``torch.compile`` a vector field ``func(t, y)`` for use with ``odeint``/``odeint_adjoint``.

    Args:
        func: callable or ``nn.Module`` with ``func(t, y) -> dy/dt`` (as for ``odeint``).
        dynamic: passed to ``torch.compile``. Default None: PyTorch specializes on the first shapes
            and recompiles once with symbolic shapes if they change. Use ``True`` with
            ``step_control="per_sample"`` (the active batch shrinks as samples finish).
        mode, backend, fullgraph: passed to ``torch.compile`` (``mode="max-autotune"`` on GPU).

    Returns:
        A callable with the same signature. For an ``nn.Module`` the result is the compiled
        module (``torch.compile`` keeps ``parameters()``, so ``odeint_adjoint`` still finds them).

    Keep Python-side state out of the field (e.g. an NFE counter ``self.calls += 1``): dynamo
    treats such attributes as constants and recompiles on every change, up to its limit, then
    falls back to eager. Count NFE with :class:`node_engine.SolverStats` instead.

    The first call compiles (seconds to minutes on CPU, needs a C++ compiler for the inductor
    backend; cached on disk by PyTorch afterwards); results agree with eager to floating-point
    round-off (fused kernels may reorder sums), see ``tests/engine/test_compile.py``.

    Raises:
        RuntimeError: from ``torch.compile`` when the backend is unavailable (at the first call).
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    return torch.compile(func, dynamic=dynamic, mode=mode, backend=backend, fullgraph=fullgraph)
