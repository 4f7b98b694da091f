"""Image classification (Chen et al. 2018, §3): cross-entropy on labelled images.

Models: odenet, rknet, resnet, mlp. Default batch size 128, as the paper trains its MNIST models.
Serves ``predict`` (class probabilities); no plots beyond the training curves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F

from node_engine.families.base import Family
from node_engine.models import build_model


class ClassifierFamily(Family):
    name: ClassVar[str] = "classifier"
    model_input: ClassVar[str] = "images"
    default_batch_size: ClassVar[int] = 128
    serves: ClassVar[tuple[str, ...]] = ("predict",)
    train_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    eval_metrics: ClassVar[tuple[str, ...]] = ("test_accuracy", "test_loss")

    #: GroupNorm grouping of the conv models built now (``classifiers.group_norm``); checkpoints
    #: without ``min_channels_per_group`` in their data info were built with 1 (the paper's rule)
    MIN_CHANNELS_PER_GROUP: ClassVar[int] = 2

    def data_info(self, data) -> dict[str, Any]:
        return {"input_shape": list(data.input_shape), "num_classes": data.num_classes,
                "n_train": int(len(data.y_train)), "n_test": int(len(data.y_test)),
                "min_channels_per_group": self.MIN_CHANNELS_PER_GROUP}

    def resume_info(self, saved, current):
        return {**current, "min_channels_per_group": int(saved.get("min_channels_per_group", 1))}

    def build_model(self, spec, info):
        return build_model(spec["model"], spec["solver"], input_shape=tuple(int(s) for s in info["input_shape"]),
                           min_channels_per_group=int(info.get("min_channels_per_group", 1)))

    def train_tensors(self, data):
        return (data.x_train, data.y_train)

    def loss(self, model, data, batch, size, generator):
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(dim=1) == labels).float().mean().item()}

    def evaluate(self, model, data, *, batch_size, device, generator):
        x, y = data.x_test.to(device), data.y_test.to(device)
        stats = model.stats
        correct, loss_sum, nfe, solves = 0, 0.0, 0, 0
        for start in range(0, len(x), batch_size):
            stats.reset()
            logits = model(x[start:start + batch_size])
            nfe, solves = nfe + stats.nfe_forward, solves + 1
            labels = y[start:start + batch_size]
            correct += int((logits.argmax(dim=1) == labels).sum())
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        return {"test_accuracy": correct / len(x), "test_loss": loss_sum / len(x), "nfe_forward": nfe / solves}

    def served(self, model, info, *, spec, step, metrics, device):
        from node_engine.datasets import Standardization
        from node_engine.inference import ClassifierModel

        return ClassifierModel(model, Standardization.from_json(info["standardization"]),
                               tuple(int(s) for s in info["input_shape"]), spec=spec, step=step,
                               metrics=metrics, device=device)
