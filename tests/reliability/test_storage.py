"""Storage under abuse (issue 14): uploads in their own precision, the owner quota, checkpoint
retention, a really full disk (a 2 MB tmpfs) answered 507, links out of the artifact folder never
followed, and ``/readyz`` reporting free space and worker heartbeats.

Sizes are checked against the ``.npy`` format itself (a header of at most 128 bytes, then N*D*itemsize
bytes), not against what the service reports.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.artifacts import InsufficientStorage, LocalArtifactStore, checkpoint_key, prune_checkpoints, save_checkpoint
from jobs.store import JobStore
from jobs.tables import make_engine, make_sessionmaker
from jobs.workers import Heartbeat
from service.app import create_app
from worker.runner import WorkerContext, run_job

pytestmark = pytest.mark.redis

TINY = {"model": {"type": "cnf", "hidden_dims": [8, 8]}, "dataset": {"name": "moons", "n_samples": 256},
        "training": {"iterations": 3}}
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"
NPY_HEADER_MAX = 128  # numpy pads the .npy header to a multiple of 64 bytes; 2-D headers fit in 128


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def upload(client, array: np.ndarray, query: str = "", headers: dict | None = None):
    return client.post(f"/v1/datasets{query}", files={"file": ("x.npy", npy(array), "application/octet-stream")},
                       headers=headers or {})


def assert_problem(resp, status: int, slug: str, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"].endswith("/" + slug), body
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body


def stored(settings, dataset_id: str) -> Path:
    return settings.artifact_dir / "datasets" / f"{dataset_id}.npy"


# ---- precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, stored_dtype", [
    (np.bool_, np.bool_), (np.int8, np.int8), (np.uint8, np.uint8), (np.int16, np.int16),
    (np.float16, np.float16), (np.float32, np.float32), (np.int32, np.int32),
    (np.float64, np.float32), (np.int64, np.float32),
])
def test_an_upload_is_stored_in_its_own_precision_at_most_float32(make_settings, dtype, stored_dtype):
    settings = make_settings()
    rng = np.random.default_rng(1)
    n, d = 200_000, 4  # 0.8 MB as bool; 6.4 MB as float64
    if np.dtype(dtype).kind == "b":
        data = rng.random((n, d)) < 0.5
    elif np.dtype(dtype).kind in "iu":
        data = rng.integers(0, 100, size=(n, d)).astype(dtype)
    else:
        data = rng.normal(size=(n, d)).astype(dtype)
    with TestClient(create_app(settings)) as client:
        resp = upload(client, data)
        assert resp.status_code == 201, resp.text
        assert resp.json()["dtype"] == np.dtype(stored_dtype).name
        path = stored(settings, resp.json()["id"])
        # the file is what the .npy format says N*D values of that dtype take, not 8 bytes a value
        assert n * d * np.dtype(stored_dtype).itemsize < path.stat().st_size <= \
            n * d * np.dtype(stored_dtype).itemsize + NPY_HEADER_MAX
        back = np.load(path, allow_pickle=False)
        assert back.dtype == stored_dtype
        np.testing.assert_array_equal(back, data.astype(stored_dtype))  # exact in its own dtype


def test_asked_precision_is_kept_and_a_value_it_cannot_hold_is_422(make_settings):
    settings = make_settings()
    data = np.random.default_rng(2).normal(size=(50, 2)) * 1e-3 + 1.0
    with TestClient(create_app(settings)) as client:
        resp = upload(client, data, "?dtype=float64")
        assert resp.status_code == 201 and resp.json()["dtype"] == "float64"
        np.testing.assert_array_equal(np.load(stored(settings, resp.json()["id"])), data)  # bit for bit
        # 7e4 overflows float16 (largest finite 65504): refused naming the field, not stored as inf
        big = np.random.default_rng(3).normal(size=(20, 2)) + 7e4
        assert_problem(upload(client, big, "?dtype=float16"), 422, "invalid-dataset", "dtype")
        # 1 + 1e-5 and 1 round to the same float16: the column would be constant
        flat = np.stack([1.0 + 1e-5 * (np.arange(20) % 2), np.arange(20.0)], axis=1)
        assert_problem(upload(client, flat, "?dtype=float16"), 422, "invalid-dataset", "dtype")
        assert_problem(upload(client, data, "?dtype=int8"), 422, "invalid-request", "dtype")
        assert list((settings.artifact_dir / "datasets").iterdir()) == [stored(settings, resp.json()["id"])]


def test_series_store_values_as_float32_and_times_as_float64_unless_asked(make_settings):
    settings = make_settings()
    rng = np.random.default_rng(6)
    t = np.cumsum(rng.uniform(0.1, 1.0, size=(4, 12)), axis=1)
    y = rng.normal(size=(4, 12, 2))
    buf = io.BytesIO()
    np.savez(buf, t=t, y=y)
    with TestClient(create_app(settings)) as client:
        for query, y_dtype in (("?kind=series", np.float32), ("?kind=series&dtype=float64", np.float64)):
            resp = client.post(f"/v1/datasets{query}", files={"file": ("s.npz", buf.getvalue(), "application/zip")})
            assert resp.status_code == 201 and resp.json()["dtype"] == np.dtype(y_dtype).name, resp.text
            with np.load(settings.artifact_dir / "datasets" / f"{resp.json()['id']}.npz") as saved:
                assert saved["t"].dtype == np.float64 and saved["y"].dtype == y_dtype
                np.testing.assert_array_equal(saved["t"], t)  # times exact: strictly increasing stays so
                np.testing.assert_allclose(saved["y"], y, rtol=2 ** -24)  # float32 rounding, relative 6e-8


# ---- quota ----------------------------------------------------------------------------------------
def test_owner_quota_counts_uploads_and_checkpoints_and_answers_507(make_settings):
    quota = 100_000
    settings = make_settings(owner_quota_bytes=quota, api_keys=f"alice:{ALICE},bob:{BOB}")
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    rows = np.random.default_rng(4).normal(size=(10_000, 1)).astype(np.float32)  # 40,000 bytes + header
    with TestClient(create_app(settings)) as client:
        first = upload(client, rows, headers=alice)
        assert first.status_code == 201, first.text
        used = stored(settings, first.json()["id"]).stat().st_size
        job = client.post("/v1/jobs", json=TINY, headers=alice).json()["id"]
        # a checkpoint of alice's job, written where the worker writes it
        LocalArtifactStore(settings.artifact_dir).put(checkpoint_key(job, "step-000001.safetensors"), b"c" * 30_000)
        used += 30_000
        body = assert_problem(upload(client, rows, headers=alice), 507, "quota-exceeded", "quota")
        reason = body["errors"][0]["reason"]
        assert str(quota) in reason and "ODEFORGE_OWNER_QUOTA_BYTES" in reason and f"{used} bytes used" in reason
        assert upload(client, rows, headers=bob).status_code == 201  # another owner has its own quota
        # at the quota, a new job (whose checkpoints would add to it) is refused too
        LocalArtifactStore(settings.artifact_dir).put(checkpoint_key(job, "step-000002.safetensors"),
                                                      b"c" * (quota - used))
        assert_problem(client.post("/v1/jobs", json=TINY, headers=alice), 507, "quota-exceeded", "quota")
        assert client.post("/v1/jobs", json=TINY, headers=bob).status_code == 202

        # freeing space: a queued job's checkpoints stay (it would resume from them); a finished one's go
        ckpt = f"/v1/jobs/{job}/checkpoints/step-000002.safetensors"
        assert_problem(client.delete(ckpt, headers=alice), 409, "job-active")
        assert_problem(client.delete(ckpt, headers=bob), 404, "job-not-found")
        client.post(f"/v1/jobs/{job}/cancel", headers=alice)
        assert client.delete(ckpt, headers=alice).status_code == 204
        assert_problem(client.delete(ckpt, headers=alice), 404, "checkpoint-not-found")
        assert client.post("/v1/jobs", json=TINY, headers=alice).status_code == 202
        # a data set: not another key's, not while an active job trains on it, then gone with its file
        ds = first.json()["id"]
        assert_problem(client.delete(f"/v1/datasets/{ds}", headers=bob), 404, "dataset-not-found")
        user = client.post("/v1/jobs", headers=alice, json={"model": {"type": "planar"},
                                                            "dataset": {"name": "upload", "id": ds}}).json()["id"]
        body = assert_problem(client.delete(f"/v1/datasets/{ds}", headers=alice), 409, "dataset-in-use")
        assert user in body["detail"]
        client.post(f"/v1/jobs/{user}/cancel", headers=alice)
        assert client.delete(f"/v1/datasets/{ds}", headers=alice).status_code == 204
        assert not stored(settings, ds).exists()
        assert upload(client, rows, headers=alice).status_code == 201  # room again


# ---- retention ------------------------------------------------------------------------------------
def test_prune_keeps_the_newest_k_periodic_checkpoints_and_the_final(tmp_path):
    store = LocalArtifactStore(tmp_path)
    for step in (5, 10, 100, 20, 1000):  # landing out of order; kept by step number
        save_checkpoint(store, "j", f"step-{step:06d}.safetensors", b"x", keep=10)
    store.put(checkpoint_key("j", "final.safetensors"), b"f")
    assert prune_checkpoints(store, "j", keep=2) == ["step-000005.safetensors", "step-000010.safetensors",
                                                     "step-000020.safetensors"]
    assert [n for n, _ in store.list("jobs/j/checkpoints")] == ["final.safetensors", "step-000100.safetensors",
                                                                "step-001000.safetensors"]
    save_checkpoint(store, "j", "step-1000000.safetensors", b"x", keep=1)  # a wider step number
    assert [n for n, _ in store.list("jobs/j/checkpoints")] == ["final.safetensors", "step-1000000.safetensors"]
    with pytest.raises(ValueError):
        prune_checkpoints(store, "j", keep=0)


class RecordingStore(LocalArtifactStore):
    """The real local store, remembering every key written (to know what retention deleted)."""

    def __init__(self, root):
        super().__init__(root)
        self.written: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data)
        self.written.append(key.rsplit("/", 1)[-1])


def test_the_worker_keeps_only_the_last_k_checkpoints_and_the_list_shows_them(make_settings, redis_client, queue_name):
    settings = make_settings(checkpoint_keep=2)
    spec = {"model": {"type": "planar", "num_layers": 2}, "dataset": {"name": "moons", "n_samples": 256},
            "training": {"iterations": 6, "batch_size": 32, "eval_every": 6, "checkpoint_every": 1}}
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json=spec).json()["id"]
        redis_client.delete(queue_name)  # the worker's code runs here, in-process (what the task calls)
        artifacts = RecordingStore(settings.artifact_dir)
        ctx = WorkerContext(settings, JobStore(make_sessionmaker(make_engine(settings.database_url))), artifacts)
        assert run_job(job, ctx) == "succeeded"
        periodic = [f"step-{s:06d}.safetensors" for s in range(1, 6)]  # every step but the last, which is final
        assert artifacts.written == [*periodic, "final.safetensors"]
        names = [c["name"] for c in client.get(f"/v1/jobs/{job}/checkpoints").json()["checkpoints"]]
        assert names == ["final.safetensors", *periodic[-2:]], names
        assert sorted(p.name for p in (settings.artifact_dir / "jobs" / job / "checkpoints").iterdir()) == names
        assert client.post(f"/v1/jobs/{job}/samples", json={"n": 3, "seed": 0}).status_code == 200
        ctx.store.close()


# ---- a full disk --------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path: Path):
    """A 2 MB tmpfs (root, or a user namespace where mounts are allowed); skipped where none can be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({res.stderr.strip() or res.returncode}); "
                    "test_enospc_from_dev_full_is_507 covers a real ENOSPC without a mount")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> None:
    """Write zeros until the file system says ENOSPC (a real full disk, no mock)."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.sync()


def test_a_full_disk_is_507_for_uploads_and_submissions_and_readyz_says_so(make_settings, full_disk):
    settings = make_settings(database_url=f"sqlite:///{full_disk / 'jobs.db'}", artifact_dir=full_disk / "artifacts",
                             min_free_bytes=0)
    data = np.random.default_rng(5).normal(size=(2000, 2)).astype(np.float32)
    with TestClient(create_app(settings)) as client:
        assert upload(client, data).status_code == 201  # room still
        fill(full_disk)
        body = assert_problem(upload(client, data), 507, "insufficient-storage", "storage")
        assert "the artifact disk has 0 bytes free" in body["detail"], body
        # below the admission check: the write itself meets ENOSPC, and leaves nothing half-written
        with pytest.raises(InsufficientStorage) as err:
            LocalArtifactStore(settings.artifact_dir).put("datasets/x.npy", b"x" * 100_000)
        assert err.value.errno == errno.ENOSPC
        assert len(list((full_disk / "artifacts" / "datasets").iterdir())) == 1  # the first upload only
        assert not list((full_disk / "artifacts").rglob(".tmp-*"))  # no half-written file left
        # the job store's disk is the same full disk: a submission is 507, not 503 database-unavailable
        body = assert_problem(client.post("/v1/jobs", json=TINY), 507, "insufficient-storage", "storage")
        assert "job store's disk is full" in body["detail"]
        assert client.get("/readyz").json()["artifact_free_bytes"] < 65536

    # the reserve: below min_free_bytes new work is refused before the disk is full, and /readyz is 503
    settings = make_settings(artifact_dir=full_disk / "artifacts", min_free_bytes=1 << 20)
    (full_disk / "filler").unlink()
    with open(full_disk / "filler", "wb") as f:  # leave 512 KB free: room, but under the 1 MB reserve
        f.write(b"\0" * (shutil.disk_usage(full_disk).free - (512 << 10)))
    with TestClient(create_app(settings)) as client:
        ready = assert_problem(client.get("/readyz"), 503, "not-ready", "artifacts")
        assert "ODEFORGE_MIN_FREE_BYTES=1048576" in ready["errors"][0]["reason"]
        assert_problem(upload(client, data), 507, "insufficient-storage", "storage")
        assert_problem(client.post("/v1/jobs", json=TINY), 507, "insufficient-storage", "storage")
        (full_disk / "filler").unlink()
        assert client.get("/readyz").status_code == 200
        assert upload(client, data).status_code == 201
        assert client.post("/v1/jobs", json=TINY).status_code == 202


def test_enospc_from_dev_full_is_507(make_settings):
    """A real ENOSPC without mounting anything: /dev/full refuses every write with it."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    app = create_app(make_settings())

    @app.post("/test-write-dev-full")
    def _write() -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()

    with TestClient(app) as client:
        assert_problem(client.post("/test-write-dev-full"), 507, "insufficient-storage", "storage")


# ---- links out of the artifact folder ----------------------------------------------------------------
def test_a_checkpoint_replaced_by_a_link_out_of_the_store_is_never_served(make_settings, tmp_path):
    settings = make_settings()
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not yours")
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs", json=TINY).json()["id"]
        folder = settings.artifact_dir / "jobs" / job / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "final.safetensors").symlink_to(secret)
        assert client.get(f"/v1/jobs/{job}/checkpoints").json()["checkpoints"] == []
        resp = client.get(f"/v1/jobs/{job}/checkpoints/final.safetensors")
        assert_problem(resp, 404, "checkpoint-not-found")
        assert b"not yours" not in resp.content
        assert_problem(client.post(f"/v1/jobs/{job}/samples", json={"n": 1}), 409, "no-checkpoint")
        # the whole folder replaced by a link out: the same
        other = client.post("/v1/jobs", json=TINY).json()["id"]
        (settings.artifact_dir / "jobs" / other).symlink_to(tmp_path)
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "final.safetensors").write_bytes(b"not yours")
        assert client.get(f"/v1/jobs/{other}/checkpoints").json()["checkpoints"] == []
        assert_problem(client.get(f"/v1/jobs/{other}/checkpoints/final.safetensors"), 404, "checkpoint-not-found")
        assert_problem(client.post(f"/v1/jobs/{other}/samples", json={"n": 1}), 409, "no-checkpoint")


# ---- worker liveness -----------------------------------------------------------------------------
def test_readyz_needs_a_live_worker_heartbeat(make_settings):
    settings = make_settings(ready_requires_worker=True, worker_heartbeat_s=0.1)
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.get("/readyz"), 503, "not-ready", "workers")
        assert [e["field"] for e in body["errors"]] == ["workers"]
        store = JobStore(make_sessionmaker(make_engine(settings.database_url)))
        beat = Heartbeat(store, "w1@test", settings.queue, every_s=0.1)
        beat.start()
        try:
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ready = client.get("/readyz").json()
            assert ready["workers"] == "ok" and ready["live_workers"] == 1 and ready["artifact_free_bytes"] > 0
            # another deployment's worker (another queue) does not count
            store.beat("w2@test", "some-other-queue", 1)
            assert client.get("/readyz").json()["live_workers"] == 1
        finally:
            beat.stop()  # a clean stop deletes the row: not ready at once
        assert_problem(client.get("/readyz"), 503, "not-ready", "workers")
        # a killed worker's row is not deleted; it ages out after three heartbeat periods
        store.beat("w3@test", settings.queue, 1)
        assert client.get("/readyz").status_code == 200
        time.sleep(0.35)
        assert_problem(client.get("/readyz"), 503, "not-ready", "workers")
        store.close()
