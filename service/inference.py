"""Inference in the API: trained checkpoints loaded once into a bounded LRU cache.

A cache entry is keyed by ``(job_id, checkpoint name)``: while a job still trains, a newer checkpoint
is a new key and the old one ages out. Loading happens outside the cache lock (a load blocks no
request for another model) but once per checkpoint (concurrent requests for it wait for that one
load), and each model has its own lock because a torch module is not safe to call from several
threads at once. Routes are sync functions, so FastAPI runs them in its threadpool, off the event
loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from jobs.artifacts import ArtifactStore, checkpoint_key, latest_checkpoint


@dataclass
class LoadedModel:
    model: Any  # node_engine.inference.DensityModel | ClassifierModel
    checkpoint: str
    lock: threading.Lock = field(default_factory=threading.Lock)


class NoCheckpoint(LookupError):
    """The job has not written a checkpoint yet."""


class ModelCache:
    """LRU cache of loaded models; at most ``capacity`` entries."""

    def __init__(self, artifacts: ArtifactStore, capacity: int, device: str = "cpu"):
        self.artifacts, self.capacity, self.device = artifacts, capacity, device
        self._entries: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}  # one loader per checkpoint at a time
        self.hits = self.misses = 0

    def _hit(self, key: tuple[str, str]) -> LoadedModel | None:
        """The cached entry for ``key`` marked most recently used, or None. Call with ``_lock`` held."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def get(self, job_id: str) -> LoadedModel:
        """The model of the job's newest checkpoint. Raises NoCheckpoint, node_engine CheckpointError."""
        name = latest_checkpoint(self.artifacts, job_id)
        if name is None:
            raise NoCheckpoint(job_id)
        key = (job_id, name)
        with self._lock:
            entry = self._hit(key)
            if entry is not None:
                return entry
            loading = self._loading.setdefault(key, threading.Lock())
        # Single flight: a burst of requests for a model not loaded yet waits for one load (and then
        # shares one entry, one lock, one batch queue) instead of loading it once per request.
        with loading:
            with self._lock:
                entry = self._hit(key)
                if entry is not None:
                    return entry
                self.misses += 1
            from node_engine.inference import load_model  # torch import only when inference is used

            try:
                data = self.artifacts.get(checkpoint_key(job_id, name))
                entry = LoadedModel(load_model(data, device=self.device), name)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)
