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
# loose tolerances and a few steps of training: joint stepping or batch-drawn noise would show far above 1e-6
FIELDS = {  # the exact concatsquash field is the TINY model of the test above
    "hutchinson": {"type": "cnf", "hidden_dims": [8, 8], "trace_estimator": "hutchinson"},
    "planar-field": {"type": "cnf", "vector_field": "planar", "planar_width": 8, "hidden_dims": [16]},
}


def _entry(spec: dict) -> LoadedModel:
    from node_engine.inference import load_model
    from node_engine.training import build_trainer
    from service.schemas import JobCreate

    trainer = build_trainer(JobCreate.model_validate(spec).model_dump(mode="json"))
    trainer.run()
    return LoadedModel(load_model(trainer.checkpoint()), "final.safetensors")


@pytest.fixture(scope="module")
def entry() -> LoadedModel:
    return _entry(TINY)


@pytest.fixture(scope="module", params=sorted(FIELDS))
def field_entry(request) -> LoadedModel:
    return _entry({"model": FIELDS[request.param], "dataset": {"name": "8gaussians", "n_samples": 512},
                   "solver": {"rtol": 1e-3, "atol": 1e-3},
                   # the planar field needs some training to leave its nearly linear start
                   "training": {"iterations": 30 if request.param == "planar-field" else 5, "batch_size": 64,
                                "lr": 1e-2, "eval_every": 1000}})


def _ask_at_once(batcher: LogDensityBatcher, entry: LoadedModel, requests: list) -> list:
    """Each request from its own thread, released together; the answers in request order."""
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = batcher.log_density(entry, requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return answers


def test_concurrent_clients_get_their_answers_alone_to_1e6(field_entry):
    # one large request (more than a 4096-point micro-batch) and small ones, all at once
    rng = np.random.default_rng(3)
    requests = [rng.normal(scale=2.0, size=(int(n), 2)) for n in (1, 4, 5000, 1, 37, 4)]
    probes = [rng.normal(scale=2.0, size=(1, 2)) for _ in requests]
    requests = [np.concatenate([p, x]) for p, x in zip(probes, requests)]  # a probe point leads each request
    alone = np.array([field_entry.model.log_density(p)[0][0] for p in probes])
    batcher = LogDensityBatcher()
    answers = _ask_at_once(batcher, field_entry, requests)
    got = np.array([a[0][0] for a in answers])
    np.testing.assert_allclose(got, alone, rtol=1e-6, atol=1e-6 * np.abs(alone).max())
    assert batcher.batches < len(requests)  # some requests shared a micro-batch


def test_concurrent_requests_are_batched_and_answered_as_if_alone(entry):
    rng = np.random.default_rng(1)
    requests = [rng.normal(size=(int(n), 2)) for n in rng.integers(1, 300, size=24)]
    alone = [entry.model.log_density(x)[0] for x in requests]
    batcher = LogDensityBatcher(max_points=1500)
    answers = _ask_at_once(batcher, entry, requests)
    for got, want, x in zip(answers, alone, requests):
        assert got is not None and got[0].shape == (len(x),) and got[1] > 0
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-9)
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


class _CountingModel:
    """The served model, counting how often the batcher asks it (to see that nothing is re-solved)."""

    def __init__(self, model):
        self.model, self.calls = model, {"log_density": 0, "log_density_rows": 0}

    def log_density(self, points):
        self.calls["log_density"] += 1
        return self.model.log_density(points)

    def log_density_rows(self, points):
        self.calls["log_density_rows"] += 1
        return self.model.log_density_rows(points)


def test_a_point_whose_solve_fails_fails_only_its_request_without_re_solving():
    import dataclasses

    from node_engine.errors import MaxNumStepsError

    served = _entry(TINY).model
    # a tight tolerance and a small step budget: some points need more trial steps than others
    served.model.use_solver(dataclasses.replace(served.model.solver, rtol=1e-9, atol=1e-9, max_num_steps=8))
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(20, 2)), 30 * rng.normal(size=(20, 2))])
    alone, failing = {}, []
    for i, p in enumerate(points):  # the reference: each point solved alone, raising as a client sees it
        try:
            alone[i] = served.log_density(p[None])[0][0]
        except MaxNumStepsError:
            failing.append(i)
    good = sorted(alone)
    assert failing and len(good) >= 12, "the step budget should split the points"
    requests = [points[good[3 * k:3 * k + 3]] for k in range(4)]
    requests.append(points[[good[12], good[13], failing[0]]])  # its third point cannot be solved
    counting = _CountingModel(served)
    entry = LoadedModel(counting, "final.safetensors")
    batcher = LogDensityBatcher()
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def ask(i: int) -> None:
        start.wait()
        try:
            answers[i] = batcher.log_density(entry, requests[i])
        except MaxNumStepsError as exc:
            answers[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for k in range(4):
        want = [alone[i] for i in good[3 * k:3 * k + 3]]
        np.testing.assert_allclose(answers[k][0], want, rtol=1e-6)
    assert isinstance(answers[4], MaxNumStepsError) and "point 2" in str(answers[4])
    assert counting.calls["log_density"] == 0  # no request was solved again on its own
    assert counting.calls["log_density_rows"] == batcher.batches < len(requests)


def trips_at_poll(n: int, reason: str):
    """A 600 s budget that trips with ``reason`` after its ``n``-th poll (deterministic, unlike a clock):
    poll 1 is the batcher's queue check, then one per solver step. ``.polls`` counts them."""
    from service.inference_pool import Budget

    class TripsAtPoll(Budget):
        polls = 0

        def expired(self) -> bool:
            self.polls += 1
            if self.polls > n:
                self.cancel(reason)
            return super().expired()

    return TripsAtPoll(600.0, None)


def test_a_budget_that_trips_stops_only_requests_that_gave_up(entry):
    """Budgets keep answers batch independent: a request whose budget has tripped is dropped before its
    solve, and one whose deadline passes mid-solve does not cut the solve short for the others."""
    from concurrent.futures import ThreadPoolExecutor

    from node_engine.errors import SolveCancelled
    from service.inference_pool import Budget

    rng = np.random.default_rng(7)
    gone, short, alive = rng.normal(size=(3, 2)), rng.normal(size=(40, 2)), rng.normal(size=(5, 2))
    want_short, want_alive = entry.model.log_density(short)[0], entry.model.log_density(alive)[0]
    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    executor.submit(gate.wait)  # the drain queues behind this: all three requests share one batch
    batcher = LogDensityBatcher(executor=executor)
    left = Budget(60.0, None)
    left.cancel("client disconnected")
    short_budget = trips_at_poll(2, "deadline")
    f_gone = batcher.submit(entry, gone, left)
    f_short = batcher.submit(entry, short, short_budget)
    f_alive = batcher.submit(entry, alive, Budget(600.0, None))
    gate.set()
    with pytest.raises(SolveCancelled):
        f_gone.result(120)
    log_p, status, _ = f_alive.result(120)
    np.testing.assert_allclose(log_p, want_alive, rtol=1e-9)
    assert not status.any()
    # `short` gave up during the solve (its route answered a timeout); the solve went on for `alive`
    assert short_budget.reason == "deadline" and short_budget.polls >= 4  # the solve stepped on after it
    np.testing.assert_allclose(f_short.result(120)[0], want_short, rtol=1e-9)
    assert batcher.batches == 1
    executor.shutdown()


def test_a_batch_is_stopped_when_every_request_in_it_gave_up(entry):
    from concurrent.futures import ThreadPoolExecutor

    from node_engine.errors import SolveCancelled

    points = np.random.default_rng(8).normal(size=(2000, 2))
    budget = trips_at_poll(3, "client disconnected")
    batcher = LogDensityBatcher(executor=ThreadPoolExecutor(1))
    future = batcher.submit(entry, points, budget)
    with pytest.raises(SolveCancelled):
        future.result(120)
    assert budget.polls == 4  # stopped at the first step after the client left, not at the end
