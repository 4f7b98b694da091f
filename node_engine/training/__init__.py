"""Training API (docs/architecture.md): ``build_trainer(spec) -> Trainer``, ``TrainingCallbacks``.

The spec's sections, defaults and bounds are in ``node_engine.specs``; what is trained and how it is
scored is the model family's (``node_engine.families``).
"""

from node_engine.specs import TrainingSection, normalize_spec
from node_engine.training.callbacks import TrainingCallbacks
from node_engine.training.trainer import Trainer, build_trainer

__all__ = ["Trainer", "TrainingCallbacks", "TrainingSection", "build_trainer", "normalize_spec"]
