"""Training API (docs/architecture.md): ``build_trainer(spec) -> Trainer``, ``TrainingCallbacks``."""

from node_engine.training.callbacks import TrainingCallbacks
from node_engine.training.config import TrainingConfig, normalize_spec
from node_engine.training.trainer import Trainer, build_trainer

__all__ = ["Trainer", "TrainingCallbacks", "TrainingConfig", "build_trainer", "normalize_spec"]
