"""Continuous normalizing flows: FFJORD (Grathwohl et al. 2019) with RNODE regularizers.

Convention (Chen et al. 2018, §4, eq. 4): the flow runs *generatively* forward in time,
    z(0) ~ N(0, I),   dz/dt = f(z(t), t),   x = z(T),
so by the instantaneous change of variables
    log p(x) = log N(z(0); 0, I) - ∫_0^T tr(∂f/∂z)(z(t), t) dt,
with z(0) found by integrating the data x backwards from T to 0 ("data -> base"). For a linear field
f = Az this is log N(e^{-AT} x) - T·tr(A). ``num_blocks`` such flows are stacked, each with its own
field and learnable end time T_k = softplus(θ_k) > 0.

Both directions are solved on the normalized time s ∈ [0, 1] (t = T s generatively, t = T(1 - s) for
the density), dz/ds = ±T f. So T is an ordinary parameter of the dynamics: the adjoint gives its
gradient through ``adjoint_params`` and the solver only ever integrates forward over [0, 1].

The ODE state is a tuple (z, Δ, [K], [B]): Δ accumulates ∫ tr(∂f/∂z) dt and K, B are the RNODE
integrals (regularizers.py). The step-size control sees only z and Δ: K and B are read once at the
end and must not make the solver take more steps, so they get a huge atol (``_IGNORED_ATOL``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from node_engine.adjoint import odeint_adjoint
from node_engine.models.cnf_divergence import (
    NOISES,
    TRACE_ESTIMATORS,
    divergence_exact,
    divergence_hutchinson,
    sample_noise,
)
from node_engine.models.cnf_fields import (NONLINEARITIES, ConcatSquashField, PlanarField, tangents_backward,
                                          tangents_forward)
from node_engine.models.regularizers import (
    RNODEWeights,
    jacobian_frobenius_integrand,
    kinetic_energy_integrand,
)
from node_engine.models.keyed_noise import keyed_noise, point_keys
from node_engine.odeint import odeint
from node_engine.specs import CNFSection, SolverSection
from node_engine.stats import SolverStats

__all__ = ["CNF", "CNFBlock", "standard_normal_log_prob"]

def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) in nats. z: (N, D) -> (N,)."""
    return -0.5 * z.pow(2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2.0 * math.pi)


# The solver's error norm is the max over tuple members of each member's RMS of
# err / (atol + rtol |y|); with this atol an RNODE member's term is ~1e-20 or less, so it never
# decides a step (the max is taken by z or Δ). Finite, as the solver requires, and < float32 max.
_IGNORED_ATOL = 1e20


def _softplus_inverse(y: float) -> float:
    if not y > 0:
        raise ValueError(f"end_time must be > 0, got {y!r}")
    return y + math.log(-math.expm1(-y))


class CNFBlock(nn.Module):
    """One continuous flow: a vector field f(t, z) and its end time T = softplus(θ) > 0.

    Args:
        field: module with ``forward(t: 0-dim, z: (N, D)) -> (N, D)``; optional
            ``analytic_divergence(t, z) -> (f, div (N,), frobenius_sq (N,))`` (used for every
            estimator) or ``jacobian_trace(t, z, frobenius=...) -> (f, div, frobenius_sq | None)``
            (forward-mode exact trace, used when trace_estimator is "exact").
        end_time: initial T (> 0).
        train_end_time: learn T (else it stays fixed).
    """

    def __init__(self, field: nn.Module, end_time: float = 1.0, train_end_time: bool = True):
        super().__init__()
        self.field = field
        self.raw_end_time = nn.Parameter(
            torch.tensor(_softplus_inverse(float(end_time))), requires_grad=bool(train_end_time)
        )

    @property
    def end_time(self) -> Tensor:
        """T as a 0-dim tensor (differentiable when trained)."""
        return F.softplus(self.raw_end_time)


class _AugmentedDynamics(nn.Module):
    """d/ds of (z, Δ, [K], [B]) for one block on normalized time s ∈ [0, 1].

    ``generative``: t = T s and dz/ds = T f; otherwise t = T(1 - s) and dz/ds = -T f.
    In both directions dΔ/ds = T tr(∂f/∂z), so log-density = log N(z_base) - Σ_blocks Δ.
    ``eps`` (Hutchinson noise) is fixed for the whole solve. With ``eps_in_state`` it is instead the
    last member of the state with derivative 0: per-sample stepping then carries each row's ε with
    its row when finished rows leave the active set, and its error estimate is exactly 0, so it
    never changes an accept/reject decision (it enters only Hairer's initial-step estimate ‖y0‖). ``end_time`` (T) and ``packed``
    (``ConcatSquashField.packed()``) are computed once per solve by the caller, so each evaluation's
    graph holds the fused field node and a few products, not the per-layer parameter plumbing.
    """

    def __init__(
        self,
        block: CNFBlock,
        *,
        generative: bool,
        with_logdet: bool,
        regularizers: tuple[str, ...],
        trace_estimator: str,
        eps: Tensor | None,
        end_time: Tensor | None = None,
        packed: tuple[Tensor, ...] | None = None,
        eps_in_state: bool = False,
    ):
        super().__init__()
        self.block = block
        self.eps_in_state = eps_in_state
        self.end_time = end_time
        self.packed = packed
        self.generative = generative
        self.with_logdet = with_logdet
        self.regularizers = regularizers
        self.trace_estimator = trace_estimator
        self.eps = eps
        self._params_need_grad = any(p.requires_grad for p in block.parameters())
        # the adjoint's VJP without autograd: fused exact trace with the log-density channel
        self.adjoint_vjp = (self._fused_adjoint_vjp if packed is not None and end_time is not None
                            and with_logdet else None)
        self._forward_trace = hasattr(block.field, "jacobian_trace")
        self._wants_frobenius = "jacobian_norm" in regularizers
        # options["compile"]: these dynamics are made anew per solve; solves of one block with this
        # structure share a compiled step (T, packed and eps are its inputs, not constants)
        self.compile_key = (id(block), generative, with_logdet, tuple(regularizers), trace_estimator,
                            eps is None, eps_in_state, packed is None, end_time is None)

    def _fused_adjoint_vjp(self, s: Tensor, state: tuple[Tensor, ...], v: tuple[Tensor, ...],
                           params: tuple[Tensor, ...]):
        """The outputs of ``forward`` (dz/ds, dΔ/ds, then the RNODE channels), vᵀ ∂outputs/∂state and
        vᵀ ∂outputs/∂p for p in ``params`` (T or one of the packed tensors; others get None), by the
        fused node's hand-written backward: the backsolve adjoint's per-evaluation work without
        building an autograd graph. s: 0-dim, z: (N, D), Δ and RNODE channels: (N,); v like the
        state. Only z is read, so the other channels' VJPs are None (zero). Same values as autograd
        through ``forward`` (tests/flows/test_cnf_forward_trace.py)."""
        z, v_z, v_d = state[0], v[0], v[1]
        with torch.no_grad():
            T = self.end_time.to(z.dtype)
            dt_dT = s if self.generative else 1.0 - s  # t = T s or T (1 - s)
            scale = T if self.generative else -T
            f, div, frob, saved = tangents_forward(self.block.field.nonlinearity, self._wants_frobenius,
                                                   T * dt_dT, z, *self.packed)
            outputs = [scale * f, T * div]
            g_f, g_frob = v_z * scale, None
            g_T = (v_z * f).sum() * (1.0 if self.generative else -1.0) + (v_d * div).sum()
            for name, v_r in zip(self.regularizers, v[2:]):
                integrand = kinetic_energy_integrand(f) if name == "kinetic_energy" else frob
                outputs.append(T * integrand)
                g_T = g_T + (v_r * integrand).sum()
                if name == "kinetic_energy":  # ∂‖f‖²/∂f = 2 f
                    g_f = g_f + (2.0 * T) * v_r.unsqueeze(1) * f
                else:
                    g_frob = T * v_r
            g_t, g_z, *g_packed = tangents_backward(saved, g_f, v_d * T, g_frob)
            g_T = g_T + g_t * dt_dT
        # matched by identity with `is`, not id(): a compiled step (options["compile"]) would guard
        # on the ids and recompile for every solve's new T and packed tensors
        pairs = ((self.end_time, g_T), *zip(self.packed, g_packed))
        return tuple(outputs), (g_z,) + (None,) * (len(state) - 1), [
            next((g for q, g in pairs if q is p), None) for p in params]

    def forward(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.eps_in_state:
            self.eps = state[-1]
            return (*self._derivatives(s, state[:-1]), torch.zeros_like(state[-1]))
        return self._derivatives(s, state)

    def _derivatives(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """dz/ds, then dΔ/ds and the RNODE integrands when asked; s: 0-dim or (B_active,)."""
        z = state[0]
        T = (self.block.end_time if self.end_time is None else self.end_time).to(z.dtype)
        t = T * s if self.generative else T * (1.0 - s)
        sign = 1.0 if self.generative else -1.0
        if not self.with_logdet and not self.regularizers:
            return (sign * T * self.block.field(t, z),)

        field = self.block.field
        if self.trace_estimator == "exact" and self._forward_trace:
            # forward-mode exact trace: plain ops, autograd records them only when grad mode is on
            extra = {} if self.packed is None else {"packed": self.packed}
            f, div, frob = field.jacobian_trace(t, z, frobenius=self._wants_frobenius, **extra)
            out = [(T if self.generative else -T) * f]
            if self.with_logdet:
                out.append(T * div)
            for name in self.regularizers:
                out.append(T * (kinetic_energy_integrand(f) if name == "kinetic_energy" else frob))
            return tuple(out)

        # A graph is needed only to differentiate the solve (backprop, adjoint backward); never for
        # the internal leaf below alone (a no-grad forward: eval, the adjoint's forward solve).
        keep_graph = torch.is_grad_enabled() and (z.requires_grad or self._params_need_grad)
        with torch.enable_grad():
            if not (keep_graph and z.requires_grad):
                # a fresh leaf: without grad mode z may be a no-grad view autograd cannot trace
                z = z.detach().requires_grad_(True)
            vjp = None
            if hasattr(field, "analytic_divergence"):
                f, div, frob = field.analytic_divergence(t, z)
            elif self.trace_estimator == "exact":
                f = field(t, z)
                div, frob = divergence_exact(f, z, create_graph=keep_graph)
            else:
                f = field(t, z)
                div, vjp = divergence_hutchinson(f, z, self.eps, create_graph=keep_graph)
                frob = None
        out = [sign * T * f]
        if self.with_logdet:
            out.append(T * div)
        for name in self.regularizers:
            if name == "kinetic_energy":
                out.append(T * kinetic_energy_integrand(f))
            else:  # jacobian_norm: exact Frobenius norm when available, else the Hutchinson VJP
                out.append(T * (frob if vjp is None else jacobian_frobenius_integrand(vjp)))
        if not keep_graph:
            out = [o.detach() for o in out]
        return tuple(out)


class CNF(nn.Module):
    """FFJORD continuous normalizing flow on R^D with a standard normal base (Grathwohl et al. 2019).

    Args:
        fields: one vector field per stacked block (see ``CNFBlock``); block 0 acts first on
            base samples.
        dim: D.
        end_time: initial T of every block (> 0).  train_end_time: learn the T's.
        trace_estimator: "exact" (forward-mode tangents for ConcatSquash fields, else D VJPs) or
            "hutchinson" (one VJP, noise drawn once per solve).
            Fields with an analytic divergence (planar) always use it.
        noise: "rademacher" or "gaussian" Hutchinson noise.
        regularization: RNODE weights (Finlay et al. 2020).
        solver: ``node_engine.specs.SolverSection``.
    Attributes:
        stats: ``SolverStats`` accumulating NFE and steps of every solve (forward and adjoint).
    Raises:
        ValueError: bad options.
    """

    def __init__(
        self,
        fields: Sequence[nn.Module],
        dim: int,
        *,
        end_time: float = 1.0,
        train_end_time: bool = True,
        trace_estimator: str = "exact",
        noise: str = "rademacher",
        regularization: RNODEWeights = RNODEWeights(),
        solver: SolverSection = SolverSection(),
    ):
        super().__init__()
        if trace_estimator not in TRACE_ESTIMATORS:
            raise ValueError(f"trace_estimator must be one of {TRACE_ESTIMATORS}, got {trace_estimator!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        if len(fields) < 1:
            raise ValueError("a CNF needs at least one block (num_blocks >= 1)")
        self.dim = int(dim)
        self.blocks = nn.ModuleList(CNFBlock(f, end_time, train_end_time) for f in fields)
        self.trace_estimator = trace_estimator
        self.noise = noise
        self.regularization_weights = regularization
        self.solver = solver
        self.stats = SolverStats()
        # (N,) int64 SolveStatus per row of the last log_prob/sample/to_base/from_base: non-zero only
        # when the solver section says raise_on_failure=False (served answers)
        self.row_status: Tensor | None = None
        self._last_regularization: dict[str, Tensor] = {}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None, dim: int) -> "CNF":
        """Build from the job spec's ``model`` (type "cnf") and ``solver`` dicts.

        Missing keys take the defaults of ``node_engine.specs.CNFSection`` (the one place they are
        written). For ``vector_field="planar"`` hidden_dims are the widths of the hypernetwork of t.

        Raises:
            ValueError: unknown vector_field / nonlinearity / estimator / noise, non-positive sizes.
        """
        spec = CNFSection.from_spec(model_spec, strict=False)
        if spec.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {spec.nonlinearity!r}")
        if spec.vector_field == "planar":
            fields = [PlanarField(dim, spec.planar_width, spec.hidden_dims) for _ in range(spec.num_blocks)]
        else:
            fields = [ConcatSquashField(dim, spec.hidden_dims, spec.nonlinearity) for _ in range(spec.num_blocks)]
        return cls(
            fields,
            dim,
            end_time=spec.end_time,
            train_end_time=spec.train_end_time,
            trace_estimator=spec.trace_estimator,
            noise=spec.noise,
            regularization=RNODEWeights(spec.kinetic_energy, spec.jacobian_norm),
            solver=SolverSection.from_spec(solver_spec, strict=False),
        )

    def set_tolerances(self, rtol: float, atol: float) -> None:
        """Use these tolerances for later solves (e.g. tighter ones for evaluation)."""
        self.solver = self.solver.with_tolerances(rtol, atol)

    def use_solver(self, solver: SolverSection) -> None:
        """Solve with ``solver`` from now on (e.g. ``solver.served()``: per-sample steps for inference)."""
        self.solver = solver

    # ---- solving ------------------------------------------------------------------------------
    def _reference(self) -> Tensor:
        return self.blocks[0].raw_end_time

    def _check_points(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points of shape (N, {self.dim}), got {tuple(x.shape)}")

    def _solve_block(
        self,
        block: CNFBlock,
        state: tuple[Tensor, ...],
        *,
        generative: bool,
        with_logdet: bool,
        regularizers: tuple[str, ...],
        generator: torch.Generator | None,
        keys: np.ndarray | None = None,
        stream: int = 0,
    ) -> tuple[Tensor, ...]:
        """Solve one block over s ∈ [0, 1]; ``keys`` (per-point uint64, :mod:`keyed_noise`) key the
        Hutchinson noise of stream ``stream`` instead of ``generator``."""
        z = state[0]
        eps = None
        needs_noise = self.trace_estimator == "hutchinson" and not hasattr(block.field, "analytic_divergence")
        if needs_noise and (with_logdet or regularizers):
            if keys is not None:
                eps = keyed_noise(keys, stream, z.shape[1], self.noise, dtype=z.dtype, device=z.device)
            else:
                eps = sample_noise(tuple(z.shape), self.noise, dtype=z.dtype, device=z.device, generator=generator)
        # once per solve, not per evaluation: T = softplus(raw T) and the fused field's parameters
        end_time = block.end_time
        fused = (self.trace_estimator == "exact" and isinstance(block.field, ConcatSquashField)
                 and len(block.field.layers) > 1 and block.field.fused_tangents)
        packed = block.field.packed() if fused else None
        eps_in_state = eps is not None and not torch.is_grad_enabled()
        func = _AugmentedDynamics(
            block,
            generative=generative,
            with_logdet=with_logdet,
            regularizers=regularizers,
            trace_estimator=self.trace_estimator,
            eps=None if eps_in_state else eps,
            end_time=end_time,
            packed=packed,
            eps_in_state=eps_in_state,
        )
        if eps_in_state:  # ε rides along as a state member with derivative 0 (follows its row)
            state = (*state, eps)
        s = torch.tensor([0.0, 1.0], dtype=z.dtype, device=z.device)
        cfg = self.solver
        # per-sample step control when the solver asks for it (served answers) and no gradient is taken
        options = cfg.solver_options()
        rtol, atol = cfg.rtol, cfg.atol
        if len(state) > 2:  # RNODE channels: an atol so large that their error never counts
            rtol = (cfg.rtol,) * len(state)
            ignored = len(state) - 2 - (1 if eps_in_state else 0)
            atol = (cfg.atol, cfg.atol) + (_IGNORED_ATOL,) * ignored + ((cfg.atol,) if eps_in_state else ())
        kwargs = dict(rtol=rtol, atol=atol, method=cfg.method, options=options, stats=self.stats)
        if cfg.adjoint and torch.is_grad_enabled():
            # the adjoint differentiates wrt what the dynamics read (T, the packed parameters);
            # autograd takes the gradients on to raw_end_time and the layers after the solve
            read = (end_time, *(packed if packed is not None else block.field.parameters()))
            params = tuple(p for p in read if p.requires_grad)
            solution = odeint_adjoint(
                func,
                state,
                s,
                adjoint_params=params,
                adjoint_options={**options, "norm": cfg.adjoint_norm} if cfg.adjoint_mode == "backsolve" else None,
                adjoint_mode=cfg.adjoint_mode,
                **kwargs,
            )
        else:
            solution = odeint(func, state, s, **kwargs)
        out = tuple(y[-1] for y in solution)
        return out[:-1] if eps_in_state else out

    def _flow(
        self,
        z: Tensor,
        *,
        generative: bool,
        with_logdet: bool,
        regularize: bool,
        generator: torch.Generator | None = None,
        keyed: bool = False,
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Run all blocks; returns (end state (N, D), Σ Δ (N,) or None, {reg name: Σ integral (N,)}).

        ``keyed``: Hutchinson noise keyed by each input row's value (block k draws stream k), so a
        row's result does not depend on the other rows; else drawn from ``generator``.
        """
        regs = self.regularization_weights.active if regularize else ()
        blocks = list(self.blocks) if generative else list(self.blocks)[::-1]
        n = z.shape[0]
        keys = point_keys(z) if keyed and self.trace_estimator == "hutchinson" else None
        total_logdet = z.new_zeros(n) if with_logdet else None
        totals = {name: z.new_zeros(n) for name in regs}
        self.row_status = torch.zeros(n, dtype=torch.int64)
        for index, block in enumerate(blocks):
            state: tuple[Tensor, ...] = (z,)
            if with_logdet or regs:
                state = (z, z.new_zeros(n), *[z.new_zeros(n) for _ in regs])
            out = self._solve_block(
                block, state, generative=generative, with_logdet=True if regs else with_logdet,
                regularizers=regs, generator=generator, keys=keys, stream=index,
            )
            z = out[0]
            if self.stats.status is not None:  # a row keeps the status of the first block it failed in
                self.row_status = torch.where(self.row_status == 0, self.stats.status, self.row_status)
            if with_logdet:
                total_logdet = total_logdet + out[1]
            for name, value in zip(regs, out[2:]):
                totals[name] = totals[name] + value
        return z, total_logdet, totals

    def _record_regularization(self, totals: dict[str, Tensor]) -> None:
        w = self.regularization_weights
        self._last_regularization = {name: getattr(w, name) * value.mean() for name, value in totals.items()}

    # ---- public interface ---------------------------------------------------------------------
    def log_prob(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """log p(x) in nats = log N(z(0); 0, I) - ∫_0^T tr(∂f/∂z) dt (Chen et al. 2018, eq. 4).

        Integrates data -> base through all blocks in reverse order. With ``trace_estimator=
        "hutchinson"`` the result is an unbiased estimate: the noise comes from ``generator`` (or the
        global RNG in training mode), or, in eval mode without a generator, is keyed by each point's
        own value and a fixed seed (:mod:`keyed_noise`), so a point's estimate is the same alone or in
        any batch. In training mode with RNODE weights > 0 the regularizers are integrated too (see
        ``regularization``).

        Args:
            x: (N, D) points, the model's dtype/device.
            generator: optional torch.Generator for the Hutchinson noise.
        Returns:
            (N,) log-densities in nats.
        Raises:
            ValueError: x is not (N, D).
            node_engine.errors.SolverError: a solve failed (step-size underflow, too many steps,
                non-finite state).
        """
        self._check_points(x)
        z, logdet, totals = self._flow(
            x, generative=False, with_logdet=True, regularize=self.training, generator=generator,
            keyed=generator is None and not self.training,
        )
        self._record_regularization(totals)
        return standard_normal_log_prob(z) - logdet

    def to_base(self, x: Tensor) -> Tensor:
        """The base point z(0) of data x: (N, D) -> (N, D) (no divergence, cheaper)."""
        self._check_points(x)
        return self._flow(x, generative=False, with_logdet=False, regularize=False)[0]

    def from_base(self, z: Tensor) -> Tensor:
        """The data point x = z(T) of base points z: (N, D) -> (N, D)."""
        self._check_points(z)
        return self._flow(z, generative=True, with_logdet=False, regularize=False)[0]

    generate = from_base  #: the flow's common name for "data points of base points" (see PlanarFlow.generate)

    def _base_samples(self, n: int, generator: torch.Generator | None) -> Tensor:
        if int(n) < 1:
            raise ValueError(f"number of samples must be >= 1, got {n!r}")
        ref = self._reference()
        # drawn on the generator's device (a CPU generator: the same points on every device)
        where = generator.device if generator is not None else ref.device
        return torch.randn(int(n), self.dim, generator=generator, dtype=ref.dtype, device=where).to(ref.device)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n samples: z(0) ~ N(0, I) integrated forward to T through all blocks (no gradient).

        Returns:
            (n, D) tensor in the model's dtype.
        Raises:
            ValueError: n < 1.  node_engine.errors.SolverError: a solve failed.
        """
        return self.from_base(self._base_samples(n, generator))

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples x ~ q and log q(x) in one generative solve, differentiable (reparameterized).

        This is what density matching needs: KL(q‖p) = E_q[log q(x) + U(x)] + log Z
        (Rezende & Mohamed 2015, eq. 18). RNODE terms are integrated in training mode.

        Returns:
            (x (n, D), log q(x) (n,) nats).
        """
        z0 = self._base_samples(n, generator)
        x, logdet, totals = self._flow(
            z0, generative=True, with_logdet=True, regularize=self.training, generator=generator
        )
        self._record_regularization(totals)
        return x, standard_normal_log_prob(z0) - logdet

    def regularization(self) -> dict[str, Tensor]:
        """Weighted RNODE terms {"kinetic_energy": λ_K·mean K, "jacobian_norm": λ_B·mean B} of the
        last training-mode ``log_prob`` / ``sample_and_log_prob``; empty when no weight is > 0."""
        return dict(self._last_regularization)
