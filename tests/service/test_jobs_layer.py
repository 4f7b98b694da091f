"""The jobs layer's contracts that the API and the workers both rely on (SQLite only: no servers)."""

from __future__ import annotations

import json
from enum import Enum
from typing import get_args

import pytest
from sqlalchemy import text

from jobs.status import TERMINAL, JobStatus
from jobs.store import JobStore
from jobs.tables import init_db, make_engine, make_sessionmaker
from service.schemas import JobPublic, job_public

SPEC = {"model": {"type": "cnf"}, "dataset": {"name": "moons"}}
WIRE = ["queued", "running", "succeeded", "failed", "cancelled"]  # the documented HTTP contract


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    init_db(engine)
    yield JobStore(make_sessionmaker(engine))
    engine.dispose()


def test_job_status_is_the_documented_wire_and_database_value():
    assert [s.value for s in JobStatus] == WIRE
    assert {s.value for s in TERMINAL} == {"succeeded", "failed", "cancelled"}
    for s in JobStatus:
        assert s == s.value and str(s) == f"{s}" == s.value and json.dumps(s) == f'"{s.value}"'
    status = JobPublic.model_fields["status"].annotation
    is_enum = isinstance(status, type) and issubclass(status, Enum)
    allowed = [m.value for m in status] if is_enum else list(get_args(status))
    assert allowed == WIRE  # the response schema and the enum list the same states


def test_rows_hold_the_plain_values_and_read_back_as_the_enum(store):
    job, _ = store.create_job(SPEC)
    row, token = store.claim(job.id)
    assert store.finish(row, token, JobStatus.SUCCEEDED)
    with store.sessions() as s:
        raw = s.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job.id}).scalar_one()
    assert type(raw) is str and raw == "succeeded"  # what a reader of the table (or an older API) sees
    job = store.get_job(job.id)
    assert job.status is JobStatus.SUCCEEDED
    assert json.loads(job_public(job).model_dump_json())["status"] == "succeeded"
    assert store.count_by_status() == {JobStatus.QUEUED: 0, JobStatus.RUNNING: 0, JobStatus.SUCCEEDED: 1,
                                       JobStatus.FAILED: 0, JobStatus.CANCELLED: 0}


def test_finish_takes_only_a_final_status_and_only_under_the_fence(store):
    job, _ = store.create_job(SPEC)
    row, token = store.claim(job.id)
    with pytest.raises(ValueError, match="final status"):
        store.finish(row, token, JobStatus.QUEUED)
    assert not store.finish(row, token + 1, JobStatus.FAILED)  # a token we never held
    assert store.get_job(job.id).status == JobStatus.RUNNING
    assert store.finish(row, token, "failed", error=("E", "why"))  # plain values still accepted
    assert store.get_job(job.id).status is JobStatus.FAILED
