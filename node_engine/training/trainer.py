"""The trainer: one loop for every model family.

What is built, its loss on a batch and its evaluation belong to the data set's model family
(``node_engine.families``: classifier, density, energy); the trainer owns what they share: the
optimizer, the data order, the step records, evaluation cadence, checkpoints and resume. It never
asks which family it runs.

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
from torch import Tensor

from node_engine.checkpoint import Checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from node_engine.datasets import Standardization, load_dataset
from node_engine.errors import CheckpointError, NonFiniteLossError, SolverError
from node_engine.families import family_for_dataset_name, get_family
from node_engine.solve_limits import solve_limits
from node_engine.specs import TrainingSection, normalize_spec
from node_engine.training.callbacks import TrainingCallbacks

# solver.compile="auto" in training: compile once the rest of the job, at its eager pace, takes
# this long (a compile is 20-200 s on a CPU and a compiled step 0.5-0.7x of eager; docs/benchmarks.md)
AUTO_COMPILE_MIN_SECONDS = 300.0
AUTO_COMPILE_WARMUP_STEPS = 5  # eager steps timed before deciding

EVAL_BATCH_MIN = 1000
_SEED_MIX = 1_000_003


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * _SEED_MIX + int(epoch)) % (2**63))


class Trainer:
    """Trains one model on one data set; see :func:`build_trainer`.

    Attributes:
        spec: the normalized job spec (dict).
        family: the model family (``node_engine.families``) of the spec's data set.
        kind: the family's name ("classifier", "density", "energy"), stored in checkpoints.
        model: the ``nn.Module`` being trained (with ``stats: SolverStats``).
        optimizer: Adam (Kingma & Ba 2015) with the spec's lr and weight decay.
        step: optimizer steps taken so far (int).
        last_eval: the latest evaluation metrics (dict, empty before the first).
    """

    def __init__(self, spec: Mapping[str, Any], *, device: str | torch.device = "cpu",
                 saved_info: Mapping[str, Any] | None = None):
        self.spec = normalize_spec(spec)
        self.config = TrainingSection.from_spec(self.spec["training"])
        self.device = torch.device(device)
        self.family = family_for_dataset_name(self.spec["dataset"]["name"])
        self.kind = self.family.name
        self.family.check_model_type(self.spec["model"]["type"], self.spec["dataset"]["name"])
        self.data = load_dataset(self.spec["dataset"])
        self._info = self.family.data_info(self.data)
        if saved_info is not None:  # resuming: the model is built as the checkpoint's was
            self._info = self.family.resume_info(saved_info, self._info)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on training.seed only
            torch.manual_seed(self.config.seed)
            self.model = self.family.build_model(self.spec, self._info)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr,
                                          weight_decay=self.config.weight_decay)
        self.step = 0
        self.elapsed_seconds = 0.0
        self._compile_from: tuple[int, float] | None = None
        self._compile_paid = False
        self.last_eval: dict[str, Any] = {}
        # noise (Hutchinson, base samples) comes from a host generator: the same draws on every
        # device, and a checkpoint's generator state resumes on any device
        self._noise = torch.Generator().manual_seed(self.config.seed)
        self._global_rng = torch.Generator().manual_seed(self.config.seed + 1).get_state()
        self._train_rtol = float(self.spec["solver"]["rtol"])
        self._train_atol = float(self.spec["solver"]["atol"])
        self._train = tuple(t.to(self.device) for t in self.family.train_tensors(self.data))
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    # ----------------------------------------------------------------------------------- sizes
    @property
    def num_parameters(self) -> int:
        """Trainable parameters of the model."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_train(self) -> int:
        """Size of the training split; 0 for families that draw fresh samples every step."""
        return int(self._train[0].shape[0]) if self._train else 0

    @property
    def batch_size(self) -> int:
        return min(self.config.batch_size, self.n_train) if self.n_train else self.config.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size) if self.n_train else 1

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: ``epochs × batches per epoch`` if epochs is set, else ``iterations``."""
        if self.config.epochs is not None and self.n_train:
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
        batch: tuple[Tensor, ...] = ()
        if self.n_train:
            idx = self._batch_indices(step)
            batch = tuple(t[idx] for t in self._train)
        return self.family.loss(self.model, self.data, batch, self.batch_size, self._noise)

    def _likely_cause(self) -> str:
        return self.family.instability_hint(self.spec["model"]["type"], self.config.lr, self.spec["solver"])

    def _auto_compile_pays(self) -> bool:
        """Whether a spec's ``solver.compile="auto"`` may compile now: once the steps left, at the
        mean eager step time so far, add up to AUTO_COMPILE_MIN_SECONDS (a first compile of a step
        costs 20-200 s on a CPU, docs/benchmarks.md). Sticky: once on, it stays on."""
        if self._compile_from is None:  # (step, elapsed) where this run started (a resume included)
            self._compile_from = (self.step, self.elapsed_seconds)
        if not self._compile_paid:
            done = self.step - self._compile_from[0]
            if done >= AUTO_COMPILE_WARMUP_STEPS:
                mean = (self.elapsed_seconds - self._compile_from[1]) / done
                self._compile_paid = mean * (self.total_steps - self.step) >= AUTO_COMPILE_MIN_SECONDS
        return self._compile_paid

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
        step_size = stats.mean_forward_step()  # forward solves only (units of t); NaN: no ODE solve
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
        epoch = {"epoch": step // self.batches_per_epoch} if self.n_train else {}
        return {"step": self.step, **epoch, "loss": total.item(), **metrics,
                "nfe_forward": int(nfe_forward), "nfe_backward": int(stats.nfe_backward),
                **({"step_size": step_size} if math.isfinite(step_size) else {}),
                **({"compile_seconds": stats.compile_seconds} if stats.compile_seconds else {}),
                "wall_seconds": seconds, "elapsed_seconds": self.elapsed_seconds,
                "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": grad_norm.item(),
                "regularizers": {name: float(value.detach()) for name, value in regularizers.items()}}

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Metrics on the test split with the evaluation tolerances (``eval_rtol``/``eval_atol``).

        Returns:
            step, the family's ``eval_metrics`` (classifier: test_accuracy, test_loss; density:
            test_nll (nats, original coordinates), test_bits_per_dim; energy: test_loss, test_ess) and
            nfe_forward (mean per batch solve).
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
        return self.family.evaluate(self.model, self.data, batch_size=max(self.config.batch_size, EVAL_BATCH_MIN),
                                    device=self.device, generator=generator)

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
                with torch.random.fork_rng(devices=[]), solve_limits(compile_auto=self._auto_compile_pays()):
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
                with solve_limits(compile_auto=self._auto_compile_pays()):
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
        """JSON-ready data-set description saved with checkpoints (name, kind, statistics, and the
        family's shapes and sizes, from which inference rebuilds the model)."""
        return {"name": self.data.name, "kind": self.data.kind, "standardization": self.standardization.to_json(),
                **self._info}

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
        trainer = cls(spec, device=device, saved_info=ckpt.dataset)
        try:
            same = get_family(ckpt.kind) is trainer.family  # older checkpoints may spell the family differently
        except ValueError:
            same = False
        if not same:
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


    def load_parameters(self, data: bytes) -> None:
        """Start from another run's parameters (fine-tuning): load the model weights of checkpoint
        ``data`` into this trainer's model; the optimizer, RNG states and step stay fresh (step 0).

        Raises:
            CheckpointError: corrupted bytes, another model family, or a model whose parameter names
                or shapes differ (another architecture or input size).
        """
        ckpt = load_checkpoint(data)
        try:
            same = get_family(ckpt.kind) is self.family
        except ValueError:
            same = False
        if not same:
            raise CheckpointError(f"init_from: checkpoint of a {ckpt.kind!r} model, this job trains a {self.kind!r} one")
        # The data may differ (fine-tuning on other samples): the weights are taken as they are.
        load_state_strict(self.model, {k: v.to(self.device) for k, v in ckpt.model_state.items()})


def build_trainer(spec: Mapping[str, Any], *, device: str | torch.device = "cpu") -> Trainer:
    """A :class:`Trainer` for a job spec (docs/architecture.md): loads the data set, builds the model and Adam.

    Raises:
        DatasetError: unknown/invalid data set. ValueError: invalid model/solver/training options or a
        model type that does not fit the data set's family (classifier on points, flow on images).
    """
    return Trainer(spec, device=device)
