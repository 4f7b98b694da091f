"""Micro-batching of concurrent log-density requests: same answers as one request at a time, real
batches under concurrency, and one request's bad input does not fail the others in its batch."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.batching import LogDensityBatcher
from service.inference import LoadedModel

TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 2, "batch_size": 32}}


@pytest.fixture(scope="module")
def entry() -> LoadedModel:
    from node_engine.inference import load_model
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    trainer = build_trainer(JobCreate.model_validate(TINY).model_dump(mode="json"))
    trainer.run()
    return LoadedModel(load_model(trainer.checkpoint()), "final.safetensors")


def test_concurrent_requests_are_batched_and_answered_as_if_alone(entry):
    rng = np.random.default_rng(1)
    requests = [rng.normal(size=(int(n), 2)) for n in rng.integers(1, 300, size=24)]
    alone = [entry.model.log_density(x)[0] for x in requests]
    batcher = LogDensityBatcher(max_points=1500)
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = batcher.log_density(entry, requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got, want, x in zip(answers, alone, requests):
        assert got is not None and got[0].shape == (len(x),) and got[1] > 0
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    assert batcher.batched_requests == len(requests)
    assert batcher.batches < len(requests)  # some requests shared a solve
    assert batcher._queues == {}  # drained: nothing left behind


def test_a_failing_request_fails_alone(entry):
    batcher = LogDensityBatcher()
    good = np.zeros((5, 2))
    bad = np.zeros((5, 3))  # wrong dimension: the model raises ValueError for it only
    results: dict = {}
    start = threading.Barrier(6)

    def ask(name: str, x: np.ndarray) -> None:
        start.wait()
        try:
            results[name] = batcher.log_density(entry, x)
        except ValueError as exc:
            results[name] = exc

    threads = [threading.Thread(target=ask, args=(f"good{i}", good)) for i in range(5)]
    threads.append(threading.Thread(target=ask, args=("bad", bad)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(results["bad"], ValueError)
    for i in range(5):
        np.testing.assert_allclose(results[f"good{i}"][0], entry.model.log_density(good)[0], rtol=1e-5)
    with pytest.raises(ValueError):
        batcher.log_density(entry, bad)  # alone, too
