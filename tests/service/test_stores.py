"""Artifact store key safety and the job schema's defaults and bounds (no server needed)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from jobs.artifacts import InvalidArtifactKey, LocalArtifactStore, latest_checkpoint
from jobs.settings import Settings
from service.schemas import JobCreate


def test_local_artifact_store_roundtrip_and_listing(tmp_path):
    store = LocalArtifactStore(tmp_path / "a")
    store.put("jobs/j1/checkpoints/step-000010.safetensors", b"abc")
    store.put("jobs/j1/checkpoints/step-000200.safetensors", b"defg")
    store.put("jobs/j1/checkpoints/step-000010.safetensors", b"xyz")  # overwrite, atomically
    assert store.get("jobs/j1/checkpoints/step-000010.safetensors") == b"xyz"
    assert store.list("jobs/j1/checkpoints") == [("step-000010.safetensors", 3), ("step-000200.safetensors", 4)]
    assert latest_checkpoint(store, "j1") == "step-000200.safetensors"
    store.put("jobs/j1/checkpoints/final.safetensors", b"f")
    assert latest_checkpoint(store, "j1") == "final.safetensors"
    assert latest_checkpoint(store, "j2") is None and store.list("jobs/j2") == []
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.startswith(".tmp")]


@pytest.mark.parametrize("key", ["", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\\..\\b", "a/\x00b",
                                 "..", "a/..", ".hidden"])
def test_keys_cannot_escape_the_root(tmp_path, key):
    store = LocalArtifactStore(tmp_path / "a")
    with pytest.raises(InvalidArtifactKey):
        store.put(key, b"x")
    with pytest.raises(InvalidArtifactKey):
        store.get(key)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    store = LocalArtifactStore(tmp_path / "a")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    os.symlink(tmp_path / "outside", tmp_path / "a" / "link")
    with pytest.raises(InvalidArtifactKey):
        store.get("link/secret")


def test_job_spec_defaults_match_the_architecture_contract():
    spec = JobCreate.model_validate({"model": {"type": "planar"}, "dataset": {"name": "u1"}}).model_dump()
    assert spec["model"] == {"type": "planar", "num_layers": 8}
    assert spec["dataset"] == {"name": "u1", "n_samples": 20000, "test_fraction": 0.2, "seed": 0, "n_points": 30,
                               "id": None}
    assert spec["training"] == {"iterations": 1000, "epochs": None, "batch_size": 512, "lr": 1e-3,
                                "weight_decay": 0.0, "seed": 0, "eval_every": 100, "checkpoint_every": 100,
                                "log_every": 1}
    resnet = JobCreate.model_validate({"model": {"type": "resnet"}, "dataset": {"name": "digits"},
                                       "training": {"epochs": 2}}).model_dump()
    assert resnet["model"] == {"type": "resnet", "channels": 64, "num_blocks": 6}
    assert resnet["training"]["iterations"] is None and resnet["training"]["epochs"] == 2


@pytest.mark.parametrize("bad", [
    {"model": {"type": "mlp"}, "dataset": {"name": "moons"}},          # classifier on points
    {"model": {"type": "cnf"}, "dataset": {"name": "mnist5k"}},        # density model on images
    {"model": {"type": "cnf", "end_time": 0}, "dataset": {"name": "moons"}},
    {"model": {"type": "cnf", "hidden_dims": []}, "dataset": {"name": "moons"}},
    {"model": {"type": "cnf"}, "dataset": {"name": "moons", "path": "/etc/passwd"}},  # paths are the worker's
    {"model": {"type": "cnf"}, "dataset": {"name": "moons", "id": "0" * 32}},
    {"model": {"type": "cnf"}, "dataset": {"name": "moons"}, "solver": {"step_size": -1}},
    {"model": {"type": "cnf"}, "dataset": {"name": "moons"}, "solver": {"rtol": float("inf")}},
])
def test_job_spec_rejects(bad):
    with pytest.raises(ValidationError):
        JobCreate.model_validate(bad)


def test_settings_validation(monkeypatch):
    monkeypatch.setenv("ODEFORGE_DEVICE", "cuda:1")
    monkeypatch.setenv("ODEFORGE_MAX_POINTS", "77")
    s = Settings()
    assert s.device == "cuda:1" and s.max_points == 77
    for bad in ({"device": "tpu"}, {"environment": "production"}, {"max_points": 0}):
        with pytest.raises(ValidationError):
            Settings(**bad)
