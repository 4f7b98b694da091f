"""Trainers: classification (ODE-Net & baselines) and density (maximum likelihood; density matching).

One loop, three objectives:

* ``classifier``: cross-entropy on labelled images (Chen et al. 2018, §3);
* ``density``: maximum likelihood, loss = E_data[−log p(x)] in standardized coordinates; NLL is
  reported in the user's original coordinates, nll_x = nll_z + Σ log std, and
  bits/dim = nll_x / (D ln 2);
* ``energy``: density matching to p ∝ exp(−U), loss = E_q[log q(x) + U(x)] = KL(q‖p) − log Z
  (Rezende & Mohamed 2015, eq. 20; Chen et al. 2018, §4.1).

Every source of randomness is explicit and saved in checkpoints: the data order of epoch e is a
permutation seeded by (seed, e); the model's noise (Hutchinson ε, base samples) comes from the
trainer's generator; the global torch RNG is forked around each step with a saved state. So a run
resumed from a checkpoint takes the same trajectory as one that never stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from node_engine.checkpoint import Checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from node_engine.datasets import ClassificationData, DensityData, EnergyData, Standardization, load_dataset
from node_engine.errors import CheckpointError, NonFiniteLossError, SolverError
from node_engine.models import CLASSIFIER_TYPES, FLOW_TYPES, build_model
from node_engine.training.callbacks import TrainingCallbacks
from node_engine.training.config import TrainingConfig, normalize_spec

EVAL_BATCH_MIN = 1000
ENERGY_EVAL_SAMPLES = 2000
_SEED_MIX = 1_000_003


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * _SEED_MIX + int(epoch)) % (2**63))


class Trainer:
    """Trains one model on one data set; see :func:`build_trainer`.

    Attributes:
        spec: the normalized job spec (dict).
        kind: "classifier", "density" or "energy".
        model: the ``nn.Module`` being trained (with ``stats: SolverStats``).
        optimizer: Adam (Kingma & Ba 2015) with the spec's lr and weight decay.
        step: optimizer steps taken so far (int).
        last_eval: the latest evaluation metrics (dict, empty before the first).
    """

    def __init__(self, spec: Mapping[str, Any], *, device: str | torch.device = "cpu"):
        self.spec = normalize_spec(spec)
        self.config = TrainingConfig.from_spec(self.spec["training"])
        self.device = torch.device(device)
        self.data = load_dataset(self.spec["dataset"])
        model_type = self.spec["model"].get("type")
        if isinstance(self.data, ClassificationData):
            if model_type not in CLASSIFIER_TYPES:
                raise ValueError(f"dataset {self.data.name!r} is a classification data set; model.type must be one "
                                 f"of {CLASSIFIER_TYPES}, got {model_type!r}")
            self.kind = "classifier"
        else:
            if model_type not in FLOW_TYPES:
                raise ValueError(f"dataset {self.data.name!r} needs a density model; model.type must be one of "
                                 f"{FLOW_TYPES}, got {model_type!r}")
            self.kind = "energy" if isinstance(self.data, EnergyData) else "density"
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on training.seed only
            torch.manual_seed(self.config.seed)
            if self.kind == "classifier":
                self.model = build_model(self.spec["model"], self.spec["solver"], input_shape=self.data.input_shape)
            else:
                self.model = build_model(self.spec["model"], self.spec["solver"], dim=self.data.dim)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr,
                                          weight_decay=self.config.weight_decay)
        self.step = 0
        self.elapsed_seconds = 0.0
        self.last_eval: dict[str, Any] = {}
        # noise (Hutchinson, base samples) comes from a host generator: the same draws on every
        # device, and a checkpoint's generator state resumes on any device
        self._noise = torch.Generator().manual_seed(self.config.seed)
        self._global_rng = torch.Generator().manual_seed(self.config.seed + 1).get_state()
        self._train_rtol = float(self.spec["solver"]["rtol"])
        self._train_atol = float(self.spec["solver"]["atol"])
        if isinstance(self.data, ClassificationData):
            self._x_train = self.data.x_train.to(self.device)
            self._y_train = self.data.y_train.to(self.device)
        elif isinstance(self.data, DensityData):
            self._x_train = self.data.train.to(self.device)
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    # ----------------------------------------------------------------------------------- sizes
    @property
    def num_parameters(self) -> int:
        """Trainable parameters of the model."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_train(self) -> int:
        return 0 if isinstance(self.data, EnergyData) else int(self._x_train.shape[0])

    @property
    def batch_size(self) -> int:
        return self.config.batch_size if self.kind == "energy" else min(self.config.batch_size, self.n_train)

    @property
    def batches_per_epoch(self) -> int:
        return 1 if self.kind == "energy" else math.ceil(self.n_train / self.batch_size)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: ``epochs × batches per epoch`` if epochs is set, else ``iterations``."""
        if self.config.epochs is not None and self.kind != "energy":
            return self.config.epochs * self.batches_per_epoch
        return self.config.iterations

    @property
    def standardization(self) -> Standardization:
        return self.data.standardization

    # ------------------------------------------------------------------------------ data order
    def _batch_indices(self, step: int) -> Tensor:
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n_train, generator=_epoch_generator(self.config.seed, epoch))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size].to(self.device)

    # -------------------------------------------------------------------------------- one step
    def _objective(self, step: int) -> tuple[Tensor, dict[str, float]]:
        """Loss of the batch for ``step`` (0-based) plus metrics (floats) for the record."""
        if self.kind == "classifier":
            idx = self._batch_indices(step)
            logits = self.model(self._x_train[idx])
            labels = self._y_train[idx]
            loss = F.cross_entropy(logits, labels)
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
            return loss, {"accuracy": accuracy}
        if self.kind == "density":
            idx = self._batch_indices(step)
            log_p = self.model.log_prob(self._x_train[idx], generator=self._noise)
            loss = -log_p.mean()
            nll = loss.item() - self.standardization.log_abs_det_jacobian(self.data.dim)
            return loss, {"nll": nll, "bits_per_dim": nll / (self.data.dim * math.log(2.0))}
        x, log_q = self.model.sample_and_log_prob(self.batch_size, generator=self._noise)
        loss = (log_q + self.data.energy(x)).mean()
        return loss, {"kl_minus_log_z": loss.item()}

    def _likely_cause(self) -> str:
        solver = self.spec["solver"]
        if self.spec["model"]["type"] in ("mlp", "resnet", "planar"):  # no ODE solve involved
            return (f"the learning rate is probably too high (lr={self.config.lr:g}); lower it"
                    + (" or use more layers (planar flows saturate)" if self.kind != "classifier" else ""))
        return (f"usually the learning rate is too high (lr={self.config.lr:g}) or the learned dynamics became "
                f"stiff/unstable at rtol={solver['rtol']:g}, atol={solver['atol']:g}; lower lr, tighten the "
                f"tolerances, or add kinetic_energy/jacobian_norm regularization")

    def _train_step(self) -> dict[str, Any]:
        step = self.step
        stats = self.model.stats
        stats.reset()
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self._objective(step)
        regularizers = self.model.regularization()
        total = loss + sum(regularizers.values()) if regularizers else loss
        if not torch.isfinite(total):
            raise NonFiniteLossError(f"loss is {total.item()} at step {step + 1} (of {self.total_steps}); "
                                     f"{self._likely_cause()}")
        nfe_forward = stats.nfe_forward
        total.backward()
        grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in self.model.parameters()
                                   if p.grad is not None))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"gradient is non-finite at step {step + 1} (loss {total.item():.6g}); "
                                     f"{self._likely_cause()}")
        self.optimizer.step()
        seconds = time.perf_counter() - started
        self.step = step + 1
        self.elapsed_seconds += seconds
        epoch = {} if self.kind == "energy" else {"epoch": step // self.batches_per_epoch}
        return {"step": self.step, **epoch, "loss": total.item(), **metrics,
                "nfe_forward": int(nfe_forward), "nfe_backward": int(stats.nfe_backward),
                "wall_seconds": seconds, "elapsed_seconds": self.elapsed_seconds,
                "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": grad_norm.item(),
                "regularizers": {name: float(value.detach()) for name, value in regularizers.items()}}

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Metrics on the test split with the evaluation tolerances (``eval_rtol``/``eval_atol``).

        Returns:
            classifier: step, test_accuracy, test_loss, nfe_forward (mean per batch solve);
            density: step, test_nll (nats, original coordinates), test_bits_per_dim, nfe_forward;
            energy: step, test_loss (E_q[log q + U], nats), test_ess (effective sample size fraction), nfe_forward.
        """
        solver = self.spec["solver"]
        self.model.set_tolerances(float(solver["eval_rtol"] or self._train_rtol),
                                  float(solver["eval_atol"] or self._train_atol))
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.seed * _SEED_MIX + self.step + 7)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed * _SEED_MIX + self.step + 11)
                with torch.no_grad():  # evaluation needs no parameter graph (fields enable grad for their trace)
                    metrics = self._evaluate(generator)
        finally:
            self.model.set_tolerances(self._train_rtol, self._train_atol)
        self.last_eval = {"step": self.step, **metrics}
        return self.last_eval

    def _evaluate(self, generator: torch.Generator) -> dict[str, Any]:
        stats = self.model.stats
        batch = max(self.config.batch_size, EVAL_BATCH_MIN)
        nfe, solves = 0, 0
        if self.kind == "classifier":
            x, y = self.data.x_test.to(self.device), self.data.y_test.to(self.device)
            correct, loss_sum = 0, 0.0
            with torch.no_grad():
                for start in range(0, len(x), batch):
                    stats.reset()
                    logits = self.model(x[start:start + batch])
                    nfe, solves = nfe + stats.nfe_forward, solves + 1
                    labels = y[start:start + batch]
                    correct += int((logits.argmax(dim=1) == labels).sum())
                    loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            return {"test_accuracy": correct / len(x), "test_loss": loss_sum / len(x), "nfe_forward": nfe / solves}
        if self.kind == "density":
            x = self.data.test.to(self.device)
            total = 0.0
            for start in range(0, len(x), batch):
                stats.reset()
                log_p = self.model.log_prob(x[start:start + batch], generator=generator).detach()
                nfe, solves = nfe + stats.nfe_forward, solves + 1
                total += float(log_p.double().sum())
            nll = -total / len(x) - self.standardization.log_abs_det_jacobian(self.data.dim)
            return {"test_nll": nll, "test_bits_per_dim": nll / (self.data.dim * math.log(2.0)),
                    "nfe_forward": nfe / solves}
        stats.reset()
        x, log_q = self.model.sample_and_log_prob(ENERGY_EVAL_SAMPLES, generator=generator)
        x, log_q = x.detach(), log_q.detach()
        log_w = (-self.data.energy(x) - log_q).double()
        ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / len(log_w)
        return {"test_loss": float(-log_w.mean()), "test_ess": ess, "nfe_forward": float(stats.nfe_forward)}

    # ------------------------------------------------------------------------------------ loop
    def run(self, callbacks: TrainingCallbacks | None = None) -> dict[str, Any]:
        """Train from ``self.step`` to ``total_steps``.

        Returns:
            final metrics: status ("completed" | "cancelled"), step, total_steps, num_parameters,
            elapsed_seconds, last training record fields (loss, ...), and the last evaluation.

        Raises:
            NonFiniteLossError: NaN/inf loss or gradient (the message names the step).
            SolverError subclasses: an ODE solve failed (a note names the training step).
        """
        callbacks = callbacks or TrainingCallbacks()
        cfg = self.config
        record: dict[str, Any] = {}
        status = "completed"
        while self.step < self.total_steps:
            if callbacks.should_stop():
                status = "cancelled"
                callbacks.on_checkpoint(f"step-{self.step:06d}.safetensors", self.checkpoint())
                break
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(self._global_rng)
                    record = self._train_step()
                    self._global_rng = torch.get_rng_state()
            except SolverError as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"during training step {self.step + 1} of {self.total_steps}")
                raise
            last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or last:
                callbacks.on_step(record)
            if self.step % cfg.eval_every == 0 or last:
                callbacks.on_eval(self.evaluate())
            if last:
                callbacks.on_checkpoint("final.safetensors", self.checkpoint())
            elif self.step % cfg.checkpoint_every == 0:
                callbacks.on_checkpoint(f"step-{self.step:06d}.safetensors", self.checkpoint())
        if status == "completed" and not self.last_eval:
            self.evaluate()  # resumed at the end already: still report test metrics
        train = {k: v for k, v in record.items() if k not in ("step", "regularizers")}
        return {**train, **self.last_eval, "status": status, "step": self.step, "total_steps": self.total_steps,
                "num_parameters": self.num_parameters, "elapsed_seconds": self.elapsed_seconds}

    # ----------------------------------------------------------------------------- checkpoints
    def dataset_info(self) -> dict[str, Any]:
        """JSON-ready data-set description saved with checkpoints (name, kind, shapes, statistics)."""
        info: dict[str, Any] = {"name": self.data.name, "kind": self.data.kind,
                                "standardization": self.standardization.to_json()}
        if isinstance(self.data, ClassificationData):
            info.update(input_shape=list(self.data.input_shape), num_classes=self.data.num_classes,
                        n_train=self.n_train, n_test=int(len(self.data.y_test)))
        else:
            info["dim"] = self.data.dim
            if isinstance(self.data, DensityData):
                info.update(n_train=self.n_train, n_test=int(len(self.data.test)))
        return info

    def checkpoint(self) -> bytes:
        """The whole training state as safetensors bytes (model, optimizer, RNG states, step, spec, statistics)."""
        ckpt = Checkpoint(kind=self.kind, spec=self.spec, step=self.step,
                          model_state=self.model.state_dict(), optimizer_state=self.optimizer.state_dict(),
                          rng_state={"torch": self._global_rng, "noise": self._noise.get_state()},
                          dataset=self.dataset_info(),
                          extra={"elapsed_seconds": self.elapsed_seconds, "last_eval": self.last_eval,
                                 "num_parameters": self.num_parameters})
        return save_checkpoint(ckpt)

    @classmethod
    def from_checkpoint(cls, data: bytes, *, device: str | torch.device = "cpu",
                        dataset_path: str | None = None) -> "Trainer":
        """Rebuild a trainer from :meth:`checkpoint` bytes; :meth:`run` then continues the same trajectory.

        Args:
            data: the bytes of a ``.safetensors`` checkpoint written by :meth:`checkpoint`.
            device: where to rebuild the model and optimizer.
            dataset_path: where the data file is *now* (uploads, MNIST), when the resuming worker sees it
                at another path than the one that wrote the checkpoint; None keeps the stored path.

        Raises:
            CheckpointError: corrupted/tampered bytes, or a model/data set that no longer matches
                (e.g. an uploaded file changed since the checkpoint was written).
        """
        ckpt = load_checkpoint(data)
        if ckpt.optimizer_state is None or "torch" not in ckpt.rng_state or "noise" not in ckpt.rng_state:
            raise CheckpointError("checkpoint lacks optimizer or RNG state; it cannot resume training")
        spec = copy.deepcopy(ckpt.spec)
        if dataset_path is not None:
            spec["dataset"]["path"] = dataset_path
        trainer = cls(spec, device=device)
        if trainer.kind != ckpt.kind:
            raise CheckpointError(f"checkpoint kind {ckpt.kind!r} does not match its spec ({trainer.kind!r})")
        saved = ckpt.dataset.get("standardization")
        if saved is not None:
            now = trainer.standardization.to_json()
            if not (np.allclose(saved["mean"], now["mean"], rtol=1e-12, atol=0)
                    and np.allclose(saved["std"], now["std"], rtol=1e-12, atol=0)):
                raise CheckpointError(f"data set {trainer.data.name!r} differs from the one the checkpoint was "
                                      f"trained on (standardization statistics changed)")
        load_state_strict(trainer.model, ckpt.model_state)
        try:
            trainer.optimizer.load_state_dict(ckpt.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"optimizer state does not match the model: {exc}") from exc
        trainer._global_rng = ckpt.rng_state["torch"].clone()
        try:
            trainer._noise.set_state(ckpt.rng_state["noise"].clone())
        except RuntimeError as exc:
            raise CheckpointError(f"invalid RNG state in checkpoint: {exc}") from exc
        trainer.step = ckpt.step
        trainer.elapsed_seconds = float(ckpt.extra.get("elapsed_seconds", 0.0))
        trainer.last_eval = dict(ckpt.extra.get("last_eval") or {})
        if not 0 <= trainer.step <= trainer.total_steps:
            raise CheckpointError(f"checkpoint step {trainer.step} outside [0, {trainer.total_steps}]")
        return trainer


def build_trainer(spec: Mapping[str, Any], *, device: str | torch.device = "cpu") -> Trainer:
    """A :class:`Trainer` for a job spec (docs/architecture.md): loads the data set, builds the model and Adam.

    Raises:
        DatasetError: unknown/invalid data set. ValueError: invalid model/solver/training options or a
        model type that does not fit the data set (classifier on points, flow on images).
    """
    return Trainer(spec, device=device)
