"""The compiled trial step (issue 17): one ``torch.compile`` (Inductor) function per (method, field,
state shape, dtype, device, tolerances) that makes a whole explicit Runge–Kutta trial step — every
stage, the new state, the error estimate and the per-row error ratio — so the dozens of small
per-step solver ops run as a few fused kernels instead of one dispatch each.

Only the accept/reject decision stays on the host (:mod:`.adaptive` and :mod:`.controller`
unchanged): one synchronisation per trial step, the ratio, as in eager mode. The function is pure:
times enter as one float64 tensor ``[t, h, t_eval_end]`` ((3,) joint, (3, B) per row) so dynamo
does not specialise on their values, tolerances as arguments, and the caller counts NFE (stages
per call). Compiled functions are cached at module level and reused across steps and solves; each
gets its own code object, so dynamo's per-code recompile limit applies per entry. Per-sample
stepping compiles with dynamic shapes (the active batch shrinks as rows finish) and pads a single
active row to two (dynamo specialises size 1), so one compile serves every active-set size.

Graceful fallback: an entry whose first call fails (a graph break under ``fullgraph=True``, e.g.
``.item()``, ``print`` or numpy in the field; a missing C++ compiler) warns once, is marked
failed, and the step runs eagerly (:class:`~.rk.RKStepper`); the reason is in
``SolverStats.compile_fallback``. Compilation wall time is reported in
``SolverStats.compile_seconds`` (calls during which dynamo compiled a graph, including recompiles).

CUDA: the step is compiled with ``mode="reduce-overhead"`` (CUDA graphs: one replay per step);
outputs that outlive the next replay are cloned. Not run on a GPU yet (benchmarks/device_check.sh).
Methods with extra dense-output stages (dopri8) and user ``norm`` callables run eagerly.
"""

from __future__ import annotations

import threading
import time
import types
import warnings
import weakref
from collections import OrderedDict

import numpy as np
import torch

from .norms import _host, error_ratio
from .rk import RKStepper
from .rows import to_device
from .tableau import ButcherTableau

__all__ = ["CompiledRKStepper", "compiled_entry", "compile_unsupported", "COMPILE_CHOICES", "AUTO_MIN_SOLVES",
           "clear_cache"]

COMPILE_CHOICES = (False, True, "auto")
_CACHE_MAX = 32
MAX_GRAPHS = 3  # compiles per entry (first + recompiles) before it gives up and runs eagerly
_CACHE: OrderedDict[tuple, "_Entry"] = OrderedDict()
_LOCK = threading.Lock()
_SEEN: OrderedDict[tuple, tuple] = OrderedDict()  # "auto": (weakref to the field, requests so far)
AUTO_MIN_SOLVES = 3  # "auto" compiles a field's step at its third solve with the same key


def _weak(func):
    try:
        return weakref.ref(func)
    except TypeError:  # not weak-referenceable: never matches, so "auto" never compiles it
        return lambda: None


def _combo(w, ks):
    """Σ_j w_j k_j over the nonzero weights (Python floats: constants of the graph)."""
    acc = None
    for wj, kj in zip(w, ks):
        if wj != 0.0:
            term = kj * wj
            acc = term if acc is None else acc + term
    return acc if acc is not None else torch.zeros_like(ks[0])


def _make_trial(tab: ButcherTableau, f, per_row: bool, t_dtype: torch.dtype, segments, used):
    """The pure trial step ``trial(arg, tv, z, k1, rtol, atol) -> (K, z_new, f_last, ratio)``.

    ``f(arg, t, z)`` is the field (``arg``: the field object, an argument so one compiled step
    serves every field object of the same structure); tv: float64 [t, h, t_eval_end], (3,) joint or (3, B) per row; z: (N,) joint or (B, D);
    k1 = f(t, z) (any shape with z's numel). Returns K: (s, N) stages k_j (joint, as the eager
    stepper's unscaled buffer) or (s, B·D) of h·k_j (per row, as its scaled buffer); z_new like z;
    f_last = f of the last stage (per row); ratio: 0-d (joint) or (B,) error ratios.
    """
    s, c, A, b, e, e3, fsal = tab.stages, tab.c, tab.a, tab.b, tab.b_err, tab.b_err3, tab.fsal

    def trial(arg, tv, z, k1, rtol, atol):
        t, h, te = tv[0], tv[1], tv[2]
        hz = h.to(z.dtype)
        if per_row:
            hz = hz.unsqueeze(1)
        fs = [k1.reshape(z.shape)]
        ks = [fs[0] * hz]
        zi = z
        for i in range(1, s):
            zi = z + _combo(A[i], ks)
            ti = te if c[i] == 1.0 else t + c[i] * h
            fs.append(f(arg, ti.to(t_dtype), zi))
            ks.append(fs[-1] * hz)
        z_new = zi if fsal else z + _combo(b, ks)
        err = _combo(e, ks)
        err3 = None if e3 is None else _combo(e3, ks)
        ratio = error_ratio(z, z_new, err, err3, rtol, atol, segments, used)
        if per_row:
            return torch.stack(ks).reshape(s, -1), z_new, fs[-1], ratio
        return torch.stack(fs), z_new, fs[-1], ratio

    # a code object of its own: dynamo caches (and limits recompiles) per code object
    code = trial.__code__.replace(co_name=f"trial_{tab.name}_{next(_SERIAL)}")
    return types.FunctionType(code, trial.__globals__, code.co_name, None, trial.__closure__)


def _serial():
    n = 0
    while True:
        n += 1
        yield n


_SERIAL = _serial()


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class _Entry:
    """One cached compiled step; ``failed`` holds the reason once it fell back to eager."""

    def __init__(self, fn, device: torch.device, dynamic: bool):
        self.cudagraph = device.type == "cuda"
        mode = "reduce-overhead" if self.cudagraph else None
        self.fn = torch.compile(fn, fullgraph=True, dynamic=dynamic or None, mode=mode)
        self.failed: str | None = None
        self.calls = 0
        self.graphs = 0  # graphs dynamo compiled for this entry (first compile and recompiles)
        self.warned = False
        self.lock = threading.Lock()

    def __call__(self, arg, tv, z, k1, rtol, atol, info):
        """The step's outputs, or None once this entry fell back to eager (warned once)."""
        if self.failed is not None:
            return None
        before = _graphs_compiled()
        start = time.perf_counter()
        try:
            if self.cudagraph:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.fn(arg, tv, z, k1, rtol, atol)
        except Exception as exc:  # graph break (fullgraph), backend/compiler failure
            if self.calls and not _is_compile_error(exc):
                raise  # the field itself failed in a later step: the user's error, as in eager
            info.compile_s += time.perf_counter() - start
            self._fail(info, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            return None
        self.calls += 1
        if _graphs_compiled() != before:
            info.compile_s += time.perf_counter() - start
            self.graphs += 1
            if self.graphs > MAX_GRAPHS:  # e.g. float(t) in the field: a recompile per value
                self._fail(info, f"recompiled {self.graphs} times (the field reads tensor values as Python "
                                 "numbers, or has Python state that changes per call)")
        if self.cudagraph:  # replays reuse the output memory; the solve keeps these across steps
            out = tuple(o.clone() for o in out)
        return out


    def _fail(self, info, reason: str) -> None:
        """From now on this entry runs eagerly; warn once, and record why in the solve's info."""
        self.failed = info.compile_fallback = reason
        if not self.warned:
            self.warned = True
            warnings.warn(f"options['compile']: the trial step could not be compiled, running eagerly ({reason})",
                          RuntimeWarning, stacklevel=3)


def _is_compile_error(exc: Exception) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx"))


def clear_cache() -> None:
    """Forget every cached compiled step (tests; memory)."""
    with _LOCK:
        _CACHE.clear()


def _tol_key(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, str(x.device))
    return float(x)


def compile_unsupported(tab, vf, norm) -> str | None:
    """Why this solve cannot use a compiled step (None: it can)."""
    if getattr(tab, "extra_c", ()):
        return f"{tab.name} has extra dense-output stages (eager)"
    if not isinstance(tab, ButcherTableau) or not tab.adaptive:
        return f"method {getattr(tab, 'name', tab)!r} is not an adaptive explicit Runge-Kutta method"
    if getattr(vf, "pure", None) is None or vf.pure() is None:
        return "the field has no traceable form (an adjoint field without adjoint_vjp)"
    if not hasattr(norm, "segments"):
        return "a user norm callable (eager)"
    return None


def compiled_entry(tab, vf, norm, shape, dtype, device, per_row: bool, min_uses: int = 1) -> _Entry | None:
    """The cached compiled step for this method, field, state shape, dtype, device and norm.

    The key holds the field's identity (``vf.func``; a new field object compiles anew, its
    parameters updated in place do not) — or, for a field with a ``compile_key`` attribute (a
    hashable description of everything that shapes its graph, e.g. the CNF's per-solve dynamics),
    its type and that key, so new objects of one structure share the step (their tensors are
    inputs) — and the tolerances' values (floats) or layout (tensors).
    ``min_uses`` > 1 ("auto"): None until this key was asked for that many times, so a field made
    anew for every solve without a ``compile_key`` is never compiled."""
    func = vf.func
    structural = getattr(func, "compile_key", None)
    fkey = ("id", id(func)) if structural is None else ("structure", type(func), structural)
    key = (tab.name, id(tab), type(vf).__name__, fkey, per_row, None if per_row else tuple(shape),
           dtype, str(device), vf.t_dtype, _tol_key(norm.rtol), _tol_key(norm.atol),
           None if norm.segments is None else tuple(norm.segments),
           None if norm.used is None else tuple(norm.used), getattr(vf, "compile_key", None))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and (structural is not None or hit[0] is func):
            _CACHE.move_to_end(key)
            return hit[1]
        if min_uses > 1:
            seen = _SEEN.get(key)
            uses = 1 + (seen[1] if seen is not None and (structural is not None or seen[0]() is func) else 0)
            if uses < min_uses:
                _SEEN[key] = (_weak(func), uses)
                while len(_SEEN) > 4 * _CACHE_MAX:
                    _SEEN.popitem(last=False)
                return None
            _SEEN.pop(key, None)
        seg = None if norm.segments is None else tuple(norm.segments)
        used = None if norm.used is None else tuple(norm.used)
        entry = _Entry(_make_trial(tab, vf.pure()[0], per_row, vf.t_dtype, seg, used), torch.device(device),
                       dynamic=per_row)
        # an identity-keyed func is kept alive with its entry, so id(func) stays unique
        _CACHE[key] = (func if structural is None else None, entry)
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
        return entry


class CompiledRKStepper(RKStepper):
    """An :class:`~.rk.RKStepper` whose trial step is one compiled call (:func:`compiled_entry`);
    dense output, last stage and compaction are the eager stepper's (its non-reuse buffers).
    ``host_ratio`` gives the loop the step's error ratio (the one host sync)."""

    def __init__(self, tab, work_shape, device, dtype, *, per_row: bool, entry: _Entry, norm, info, arg):
        super().__init__(tab, work_shape, device, dtype, reuse_buffer=False, per_row=per_row)
        self.entry = entry
        self.arg = arg  # the field object(s) the compiled step takes as its first argument
        self.info = info
        self._rtol, self._atol = norm.rtol, norm.atol
        self._ratio = None
        self._calls_per_step = tab.stages - 1

    def step(self, vf, t, t_new, t_end_eval, z, k1):
        h = t_new - t
        n = z.shape[0] if self.per_row else 1
        if self.per_row:
            tv = to_device(np.stack([t, h, t_end_eval]), self.device, torch.float64)
            zz, kk = z, k1
            if n == 1:  # dynamo specialises a dim of size 1: pad to 2 so one graph serves all sizes
                tv, zz, kk = tv.repeat(1, 2), z.repeat(2, 1), k1.reshape(1, -1).repeat(2, 1)
        else:
            tv = torch.tensor([t, h, t_end_eval], dtype=torch.float64, device=self.device)
            zz, kk = z, k1
        out = self.entry(self.arg, tv, zz, kk, self._rtol, self._atol, self.info)
        if out is None:
            self._ratio = None
            return super().step(vf, t, t_new, t_end_eval, z, k1)
        K, z_new, f_last, ratio = out
        if self.per_row and n == 1:
            K = K.view(self.s, 2, -1)[:, 0].contiguous()
            z_new, f_last, ratio = z_new[:1], f_last[:1], ratio[:1]
        vf.nfe += self._calls_per_step
        if self.per_row:
            vf.sample_evaluations += self._calls_per_step * n
            self._f_last = f_last if self.fsal else None
        else:
            self._h = h
        self.K = K
        self._extra_done = True
        self._ratio = ratio
        self.info.compiled_steps += 1
        return z_new

    def host_ratio(self, norm, z, z_new):
        """The last trial step's error ratio per row on the host (float joint, (B,) float64 array)."""
        if self._ratio is None:  # this step ran eagerly
            err, err3, scale = self.error()
            return scale * norm.ratio(z, z_new, err, err3)
        return _host(self._ratio)
