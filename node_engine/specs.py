"""The job spec, one frozen definition per section: each default and each bound is written here once.

Sections (docs/architecture.md, "Job spec"): ``solver`` (:class:`SolverSection`), ``training``
(:class:`TrainingSection`), ``dataset`` (:class:`DatasetSection`) and one section per model type
(:class:`CNFSection`, :class:`PlanarSection`, :class:`ODENetSection`, :class:`ResNetSection`,
:class:`MLPSection`, :class:`NODESection`, :class:`LatentODESection`, :class:`RNNSection`). A field's
bounds live in its ``metadata`` (``ge``/``gt``/``le``/``lt``,
``choices``, ``items`` for list elements, ``min_items``/``max_items``); ``__post_init__`` checks them
(ValueError naming ``section.field``), and the service's pydantic schemas are built from the same
metadata (``service/schemas.py``; ``tests/models/test_specs.py`` checks they agree).

Defaults that differ by model family (``training.batch_size``: 128 for classifiers as in Chen et
al. 2018, 512 for flows as in FFJORD) are ``None`` here and filled in by the family
(``node_engine.families``) in :func:`normalize_spec`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from node_engine.solvers import ADAPTIVE, FIXED, METHODS, STIFF
from node_engine.solve_limits import current_limits

__all__ = ["SolverSection", "TrainingSection", "DatasetSection", "CNFSection", "PlanarSection", "ODENetSection",
           "ResNetSection", "MLPSection", "NODESection", "LatentODESection", "RNNSection", "MODEL_SECTIONS", "bounded",
           "check_bounds", "normalize_spec"]


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple | None = None, items: Mapping[str, float] | None = None,
            min_items: int | None = None, max_items: int | None = None, doc: str = "", internal: bool = False):
    """A dataclass field with its default, bounds and one-line ``doc`` (``internal``: not part of the job spec)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, items=items, min_items=min_items,
                                  max_items=max_items, doc=doc, internal=internal).items() if v is not None}
    return dataclasses.field(default=default, metadata=meta)


def _violation(value: Any, meta: Mapping[str, Any]) -> str | None:
    if value is None:
        return None
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return "must be finite"
        for key, word, ok in (("ge", ">=", operator.ge), ("gt", ">", operator.gt),
                              ("le", "<=", operator.le), ("lt", "<", operator.lt)):
            if key in meta and not ok(value, meta[key]):
                return f"must be {word} {meta[key]:g}"
    if isinstance(value, (tuple, list)):
        if len(value) < meta.get("min_items", 0) or len(value) > meta.get("max_items", math.inf):
            return f"needs {meta.get('min_items', 0)} to {meta.get('max_items')} items"
        for i, item in enumerate(value):
            reason = _violation(item, meta.get("items", {}))
            if reason:
                return f"item {i} {reason}"
    return None


def check_bounds(section: Any) -> None:
    """Check every field of a section dataclass against its metadata.

    Raises:
        ValueError: ``"<section>.<field> must be ..., got <value>"`` for the first violation.
    """
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        reason = _violation(value, f.metadata)
        if reason:
            raise ValueError(f"{section.SECTION}.{f.name} {reason}, got {value!r}")


class _Section:
    """Shared construction: ``from_spec`` (unknown keys refused, nulls mean "the default") and ``to_json``."""

    SECTION: ClassVar[str] = ""
    IGNORED: ClassVar[tuple[str, ...]] = ()  # keys of the spec section that belong elsewhere

    def __post_init__(self) -> None:
        check_bounds(self)

    @classmethod
    def spec_fields(cls) -> list[dataclasses.Field]:
        """The fields a job spec may set (internal ones excluded)."""
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None, *, strict: bool = True):
        """Build from a spec section; missing or null keys take the defaults.

        Raises:
            ValueError: unknown keys (when ``strict``), values out of bounds, wrong types.
        """
        spec = dict(spec or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - names - set(cls.IGNORED))
        if unknown and strict:
            raise ValueError(f"unknown {cls.SECTION} option(s) {unknown}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if spec.get(f.name) is None:
                continue
            value = spec[f.name]
            # the annotation names the type also where the default is None ("float | None")
            kind = {"bool": bool, "int": int, "float": float}.get(str(f.type).split("|")[0].strip(),
                                                                   type(f.default))
            try:
                if kind is bool:
                    if not isinstance(value, bool):  # bool("false") would be True
                        raise ValueError(f"must be true or false, got {value!r}")
                elif kind is int:
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError(f"must be a whole number, got {value!r}")
                    value = int(value)
                elif kind is float:
                    value = float(value)
                elif kind is tuple:
                    value = tuple(int(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{cls.SECTION}.{f.name}: {exc}") from exc
            kwargs[f.name] = value
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """The section as JSON-ready spec values (tuples as lists), internal fields left out."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in self.spec_fields()}


# ---- solver -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverSection(_Section):
    """How a model's ODEs are solved (job spec ``solver``).

    ``step_control`` is not part of the spec: inference sets ``"per_sample"`` for served answers
    (each row its own steps, so an answer does not depend on the rest of its batch).
    """

    SECTION: ClassVar[str] = "solver"

    method: str = bounded("dopri5", choices=tuple(sorted({**METHODS, **STIFF})),
                          doc="solver name (torchdiffeq names); kvaerno5: the adaptive stiff choice (implicit ESDIRK "
                              "5(4), a Newton solve on a dense Jacobian per sample: small states; with adjoint true "
                              "it needs adjoint_mode checkpoint)")
    rtol: float = bounded(1e-5, gt=0.0, lt=1.0, doc="relative tolerance of the adaptive step control")
    atol: float = bounded(1e-5, gt=0.0, lt=1.0, doc="absolute tolerance of the adaptive step control")
    adjoint: bool = bounded(True, doc="gradients by the adjoint method (O(1) memory)")
    adjoint_norm: str = bounded("seminorm", choices=("seminorm", "default"),
                                doc="seminorm: parameter-gradient channels do not control backward steps")
    adjoint_mode: str = bounded("backsolve", choices=("backsolve", "checkpoint"), doc="backsolve or ACA checkpoints")
    step_size: float | None = bounded(None, gt=0.0, le=100.0, doc="fixed-grid step")
    max_num_steps: int = bounded(10_000, ge=1, le=1_000_000, doc="step budget of one solve")
    compile: str = bounded("auto", choices=("auto", "on", "off"),
                           doc="compiled trial step (torch.compile) for the explicit adaptive solves of training: "
                               "auto = small states on the CPU, from the third solve of a field; on; off. Same "
                               "results to rounding; the compile time is reported per metric row (compile_seconds)")
    eval_rtol: float | None = bounded(None, gt=0.0, lt=1.0, doc="rtol at evaluation and inference (null: rtol)")
    eval_atol: float | None = bounded(None, gt=0.0, lt=1.0, doc="atol at evaluation and inference (null: atol)")
    step_control: str = bounded("joint", choices=("joint", "per_sample"), internal=True)
    # False: a row whose solve fails gets a status (odeint's raise_on_failure=False) instead of
    # failing the whole call; the inference batcher uses it so one bad point fails only its request
    raise_on_failure: bool = bounded(True, internal=True)

    def solver_options(self, method: str | None = None, *, default_step: float | None = None) -> dict[str, Any]:
        """``odeint`` options for ``method`` (default: this section's): the grid step of fixed-grid
        methods (``step_size``, else ``default_step``), the step budget of adaptive ones, and
        ``step_control="per_sample"`` when this section asks for it and no gradient is being
        recorded (served answers; the one place a model decides on per-sample stepping), and the
        caller's ``max_nfe`` / ``stop`` (:func:`node_engine.solve_limits.solve_limits`).

        Raises:
            ValueError: a fixed-grid method without a step size and no ``default_step``.
        """
        method = method or self.method
        if method in FIXED:
            step = self.step_size if self.step_size is not None else default_step
            if step is None:
                raise ValueError(f"solver.step_size: method {method!r} is fixed-step and needs a step size "
                                 f"(e.g. 0.05; adaptive methods need none: {', '.join(sorted(ADAPTIVE))})")
            limits = current_limits()
            limits.pop("compile", None), limits.pop("compile_auto", None)
            return {"step_size": float(step), **limits}
        limits = current_limits()
        allowed, auto_ok = limits.pop("compile", False), limits.pop("compile_auto", True)
        options: dict[str, Any] = {"max_num_steps": int(self.max_num_steps), **limits}
        if allowed and method in ADAPTIVE:  # explicit adaptive RK only
            if self.compile == "on" or (self.compile == "auto" and auto_ok):
                options["compile"] = True if self.compile == "on" else "auto"
        if self.step_control == "per_sample" and not torch.is_grad_enabled() and method not in FIXED:
            options["step_control"] = "per_sample"
        if not self.raise_on_failure and not torch.is_grad_enabled():
            options["raise_on_failure"] = False
        return options

    def __post_init__(self) -> None:
        super().__post_init__()
        reason = stiff_adjoint_error(self.method, self.adjoint, self.adjoint_mode)
        if reason:
            raise ValueError(reason)

    def with_tolerances(self, rtol: float, atol: float) -> "SolverSection":
        return dataclasses.replace(self, rtol=float(rtol), atol=float(atol))

    def served(self) -> "SolverSection":
        """The solver of served answers: the evaluation tolerances and per-sample step control."""
        return dataclasses.replace(self, rtol=float(self.eval_rtol or self.rtol),
                                   atol=float(self.eval_atol or self.atol), step_control="per_sample")


def stiff_adjoint_error(method: str, adjoint: bool, adjoint_mode: str) -> str | None:
    """Why a solver section with these values is refused, or None: ``kvaerno5`` with the backsolve
    adjoint (it integrates the state backwards in time, which on a stiff problem grows its fast
    modes exponentially: thousands of tiny backward steps and gradients off by far more than the
    tolerance, docs/torchdiffeq.md); the checkpoint adjoint (exact gradient of the forward steps)
    or ``adjoint: false`` (backprop through the solve) work."""
    if method in STIFF and adjoint and adjoint_mode == "backsolve":
        return (f"solver.adjoint_mode: method {method!r} (stiff) with adjoint true needs adjoint_mode 'checkpoint' "
                f"(backsolve integrates the state backwards, unstable on stiff problems), or set adjoint false")
    return None


# ---- training ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSection(_Section):
    """Optimization settings (Adam). ``epochs`` (if set) overrides ``iterations``; counts are optimizer
    steps. ``batch_size`` null: the model family's default (classifier 128, flows 512)."""

    SECTION: ClassVar[str] = "training"

    iterations: int = bounded(1000, ge=1, le=1_000_000, doc="optimizer steps (when epochs is null)")
    epochs: int | None = bounded(None, ge=1, le=10_000, doc="passes over the training split")
    batch_size: int | None = bounded(None, ge=1, le=65_536, doc="null: the family's default")
    lr: float = bounded(1e-3, gt=0.0, le=10.0, doc="Adam learning rate")
    weight_decay: float = bounded(0.0, ge=0.0, le=1.0, doc="Adam weight decay")
    seed: int = bounded(0, ge=0, le=2**32 - 1, doc="initial weights, data order, noise")
    eval_every: int = bounded(100, ge=1, le=1_000_000, doc="steps between evaluations")
    checkpoint_every: int = bounded(100, ge=1, le=1_000_000, doc="steps between checkpoints")
    log_every: int = bounded(1, ge=1, le=1_000_000, doc="steps between metric records")


# ---- dataset ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSection(_Section):
    """Which data (job spec ``dataset``): a registry name plus size, split and seed; ``path`` is set by
    the worker (uploads) or the operator (MNIST), never by the API."""

    SECTION: ClassVar[str] = "dataset"
    IGNORED: ClassVar[tuple[str, ...]] = ("id",)

    name: str = bounded("", doc="registry name (node_engine.datasets.DATASETS)")
    n_samples: int = bounded(20_000, ge=10, le=1_000_000, doc="points generated / images kept")
    test_fraction: float = bounded(0.2, ge=0.01, le=0.9, doc="share held out for evaluation")
    seed: int = bounded(0, ge=0, le=2**32 - 1, doc="generation and split seed")
    n_points: int = bounded(30, ge=2, le=200, doc="observations per generated time series (spirals: at most 100; "
                                                   "Chen et al. 2018 Table 2 uses 30, 50, 100)")
    path: str | None = bounded(None, internal=True)


# ---- models -----------------------------------------------------------------------------------
class _ModelSection(_Section):
    SECTION: ClassVar[str] = "model"
    IGNORED: ClassVar[tuple[str, ...]] = ("type",)
    TYPES: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class CNFSection(_ModelSection):
    """Continuous normalizing flow (FFJORD, Grathwohl et al. 2019) with RNODE regularizers (Finlay et al. 2020)."""

    TYPES: ClassVar[tuple[str, ...]] = ("cnf",)

    hidden_dims: tuple = bounded((64, 64, 64), items={"ge": 1, "le": 1024}, min_items=1, max_items=8,
                                 doc="hidden widths of the field (of the hypernetwork for planar fields)")
    nonlinearity: str = bounded("tanh", choices=("tanh", "softplus"))
    num_blocks: int = bounded(1, ge=1, le=10, doc="stacked flows, each with its own field and end time")
    vector_field: str = bounded("concatsquash", choices=("concatsquash", "planar"))
    planar_width: int = bounded(16, ge=1, le=1024, doc="units M of a planar field")
    trace_estimator: str = bounded("exact", choices=("exact", "hutchinson"))
    noise: str = bounded("rademacher", choices=("rademacher", "gaussian"), doc="Hutchinson noise")
    end_time: float = bounded(1.0, gt=0.0, le=100.0, doc="initial T of every block")
    train_end_time: bool = bounded(True, doc="learn T")
    kinetic_energy: float = bounded(0.0, ge=0.0, le=1e3, doc="RNODE weight of ∫‖f‖²")
    jacobian_norm: float = bounded(0.0, ge=0.0, le=1e3, doc="RNODE weight of ∫‖∂f/∂z‖_F²")


@dataclass(frozen=True)
class PlanarSection(_ModelSection):
    """Discrete planar flow (Rezende & Mohamed 2015)."""

    TYPES: ClassVar[tuple[str, ...]] = ("planar",)

    num_layers: int = bounded(8, ge=1, le=256)


@dataclass(frozen=True)
class ODENetSection(_ModelSection):
    """ODE-Net or RK-Net (Chen et al. 2018, §3): channels C of every convolution."""

    TYPES: ClassVar[tuple[str, ...]] = ("odenet", "rknet")

    channels: int = bounded(64, ge=2, le=512, doc="channels C (>= 2: GroupNorm needs 2 channels per group to learn)")


@dataclass(frozen=True)
class ResNetSection(_ModelSection):
    """Residual network baseline (Chen et al. 2018, Table 1)."""

    TYPES: ClassVar[tuple[str, ...]] = ("resnet",)

    channels: int = bounded(64, ge=2, le=512, doc="channels C (>= 2: GroupNorm needs 2 channels per group to learn)")
    num_blocks: int = bounded(6, ge=1, le=64)


@dataclass(frozen=True)
class MLPSection(_ModelSection):
    """One-hidden-layer perceptron baseline (Chen et al. 2018, Table 1)."""

    TYPES: ClassVar[tuple[str, ...]] = ("mlp",)

    hidden: int = bounded(300, ge=1, le=4096)


@dataclass(frozen=True)
class NODESection(_ModelSection):
    """Neural ODE on time series, dy/dt = f_θ(t, y) with an MLP field (Chen et al. 2018), optionally
    augmented with ``augment_dim`` zero-initialized dimensions (Dupont et al. 2019)."""

    TYPES: ClassVar[tuple[str, ...]] = ("node",)

    hidden_dims: tuple = bounded((64, 64), items={"ge": 1, "le": 1024}, min_items=1, max_items=8,
                                 doc="hidden widths of the MLP field")
    nonlinearity: str = bounded("tanh", choices=("tanh", "softplus"))
    augment_dim: int = bounded(0, ge=0, le=64, doc="extra state dimensions starting at 0 (augmented ODE)")


@dataclass(frozen=True)
class LatentODESection(_ModelSection):
    """Latent ODE with an ODE-RNN encoder (Rubanova et al. 2019; Chen et al. 2018 §5): q(z0 | observations)
    from an ODE-RNN run backwards in time, dz/dt = f(z) from a reparameterized z0, a decoder to the
    observations; trained on the negative ELBO with a fixed observation noise and KL annealing."""

    TYPES: ClassVar[tuple[str, ...]] = ("latent_ode",)

    latent_dim: int = bounded(4, ge=1, le=256, doc="dimension of z (Chen et al. 2018 use 4 on spirals)")
    hidden: int = bounded(20, ge=1, le=1024, doc="hidden width of the latent field, the encoder's field and the decoder")
    rec_hidden: int = bounded(25, ge=1, le=1024, doc="GRU units of the ODE-RNN encoder")
    obs_std: float = bounded(0.1, gt=0.0, le=10.0, doc="fixed observation noise std of the likelihood, in "
                                                         "standardized units (the data's std is 1)")
    kl_anneal_steps: int = bounded(100, ge=0, le=1_000_000, doc="training steps over which the KL weight ramps "
                                                                 "linearly from 0 to 1 (0: weight 1 from the start)")
    elbo_samples: int = bounded(1, ge=1, le=64, doc="posterior draws of z0 per series in the ELBO's Monte Carlo estimate")


@dataclass(frozen=True)
class RNNSection(_ModelSection):
    """GRU baseline with the time gap as an input (Chen et al. 2018 §5.1, "RNN"); no ODE."""

    TYPES: ClassVar[tuple[str, ...]] = ("rnn",)

    hidden: int = bounded(32, ge=1, le=1024, doc="GRU units (and the decoder's hidden width)")


#: model type -> its section class
MODEL_SECTIONS: dict[str, type[_ModelSection]] = {
    t: cls for cls in (CNFSection, PlanarSection, ODENetSection, ResNetSection, MLPSection, NODESection,
                       LatentODESection, RNNSection)
    for t in cls.TYPES
}


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``spec`` with every section's defaults filled in (the family's batch size too).

    Raises:
        ValueError: a section is missing, not a mapping, or has unknown/out-of-bound values.
        DatasetError: an unknown data set name.
    """
    from node_engine.families import family_for_dataset_name

    if not isinstance(spec, Mapping):
        raise ValueError("job spec must be a mapping with model, dataset, solver, training")
    out = copy.deepcopy(dict(spec))
    check_run_fields(out)  # name, tags, init_from: kept as they are
    for section in ("model", "dataset"):
        if not isinstance(out.get(section), Mapping):
            raise ValueError(f"job spec needs a '{section}' mapping")
    model = dict(out["model"])
    section = MODEL_SECTIONS.get(model.get("type"))
    if section is None:
        raise ValueError(f"unknown model type {model.get('type')!r}; "
                         f"expected one of {', '.join(sorted(MODEL_SECTIONS))}")
    out["model"] = {"type": model["type"], **section.from_spec(model).to_json()}
    dataset = dict(out["dataset"])
    out["dataset"] = {**DatasetSection.from_spec(dataset).to_json(), "path": dataset.get("path"),
                      **({"id": dataset["id"]} if dataset.get("id") is not None else {})}
    out["solver"] = SolverSection.from_spec(out.get("solver")).to_json()
    training = TrainingSection.from_spec(out.get("training")).to_json()
    if training["batch_size"] is None:
        training["batch_size"] = family_for_dataset_name(out["dataset"]["name"]).default_batch_size
    out["training"] = training
    return out


# ---- run metadata and fine-tuning: top-level fields beside the sections ---------------------------
#: ``name``: a free-form label of the run, at most this many characters (no control characters).
RUN_NAME_MAX_CHARS = 200
#: ``tags``: at most this many labels per run, each matching :data:`RUN_TAG_PATTERN` (<= 64 characters).
RUN_TAGS_MAX = 32
RUN_TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/=+-]{0,63}$"
#: ``init_from.checkpoint``: a checkpoint file name as the artifact store writes them.
CHECKPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,100}\.safetensors$"
#: ``init_from.job``: a job id.
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


def check_run_fields(spec: Mapping[str, Any]) -> None:
    """Check the top-level ``name``, ``tags`` and ``init_from`` of a job spec (all optional).

    ``name``: str of 1..RUN_NAME_MAX_CHARS characters without control characters; ``tags``: a list of
    at most RUN_TAGS_MAX distinct strings matching RUN_TAG_PATTERN; ``init_from``: ``{"job": <id>,
    "checkpoint": <name>}`` (the model starts from that checkpoint's parameters).

    Raises:
        ValueError: naming the field (``"tags[2] ..."``).
    """
    import re

    name = spec.get("name")
    if name is not None:
        if not isinstance(name, str) or not 1 <= len(name) <= RUN_NAME_MAX_CHARS:
            raise ValueError(f"name must be a string of 1 to {RUN_NAME_MAX_CHARS} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError("name must not contain control characters")
    tags = spec.get("tags")
    if tags is not None:
        if not isinstance(tags, (list, tuple)) or len(tags) > RUN_TAGS_MAX:
            raise ValueError(f"tags must be a list of at most {RUN_TAGS_MAX} strings")
        for i, tag in enumerate(tags):
            if not isinstance(tag, str) or not re.match(RUN_TAG_PATTERN, tag):
                raise ValueError(f"tags[{i}] must match {RUN_TAG_PATTERN} (letters, digits, _.:/=+-; up to 64)")
    init = spec.get("init_from")
    if init is not None:
        if not isinstance(init, Mapping) or set(init) - {"job", "checkpoint"}:
            raise ValueError("init_from must be {'job': <job id>, 'checkpoint': <checkpoint name>}")
        if not isinstance(init.get("job"), str) or not re.match(JOB_ID_PATTERN, init["job"]):
            raise ValueError("init_from.job must be a job id (32 hexadecimal digits)")
        if not isinstance(init.get("checkpoint"), str) or not re.match(CHECKPOINT_NAME_PATTERN, init["checkpoint"]):
            raise ValueError("init_from.checkpoint must be a checkpoint name such as 'final.safetensors'")
