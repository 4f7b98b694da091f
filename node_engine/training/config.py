"""The job spec's ``training`` section with defaults, validated (docs/architecture.md)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from node_engine.solvers import METHODS

DEFAULT_SOLVER: dict[str, Any] = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "adjoint": True,
                                  "adjoint_norm": "seminorm", "adjoint_mode": "backsolve", "step_size": None,
                                  "max_num_steps": 10000, "eval_rtol": None, "eval_atol": None}
DEFAULT_DATASET: dict[str, Any] = {"n_samples": 20000, "test_fraction": 0.2, "seed": 0, "path": None}


@dataclass(frozen=True)
class TrainingConfig:
    """Optimization settings. ``epochs`` (if set) overrides ``iterations``; counts are optimizer steps."""

    iterations: int = 1000
    epochs: int | None = None
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, f"training.iterations must be >= 1, got {self.iterations}"),
            (self.epochs is None or self.epochs >= 1, f"training.epochs must be >= 1 or null, got {self.epochs}"),
            (self.batch_size >= 1, f"training.batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"training.lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"training.weight_decay must be >= 0, got {self.weight_decay}"),
            (self.eval_every >= 1, f"training.eval_every must be >= 1, got {self.eval_every}"),
            (self.checkpoint_every >= 1, f"training.checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"training.log_every must be >= 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "TrainingConfig":
        """Build from the ``training`` dict; unknown keys raise ValueError naming them."""
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        kwargs = {k: v for k, v in spec.items() if v is not None or k == "epochs"}
        try:
            for key in ("iterations", "batch_size", "seed", "eval_every", "checkpoint_every", "log_every"):
                if key in kwargs:
                    kwargs[key] = int(kwargs[key])
            if kwargs.get("epochs") is not None:
                kwargs["epochs"] = int(kwargs["epochs"])
            for key in ("lr", "weight_decay"):
                if key in kwargs:
                    kwargs[key] = float(kwargs[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training options must be numbers: {exc}") from exc
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``spec`` with the solver, dataset and training defaults filled in.

    Raises:
        ValueError: a section is missing or not a mapping.
    """
    if not isinstance(spec, Mapping):
        raise ValueError("job spec must be a mapping with model, dataset, solver, training")
    out = copy.deepcopy(dict(spec))
    for section in ("model", "dataset"):
        if not isinstance(out.get(section), Mapping):
            raise ValueError(f"job spec needs a '{section}' mapping")
    out["model"] = dict(out["model"])
    # null means "the default" (pydantic schemas send explicit nulls)
    out["dataset"] = {**DEFAULT_DATASET, **{k: v for k, v in dict(out["dataset"]).items() if v is not None}}
    out["solver"] = {**DEFAULT_SOLVER, **{k: v for k, v in dict(out.get("solver") or {}).items() if v is not None}}
    method = out["solver"]["method"]
    if method not in METHODS:
        raise ValueError(f"unknown solver.method {method!r}; expected one of {', '.join(sorted(METHODS))}")
    out["training"] = TrainingConfig.from_spec(out.get("training")).to_json()
    return out
