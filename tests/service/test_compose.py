"""docker-compose.yml describes a working production layout (parsed, not run: no Docker here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.settings import Settings
from service.cli import app as cli_app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service["environment"]
    return {k: str(v) for k, v in (env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env))}


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert {"redis", "postgres", "api", "worker-gpu0"} <= set(services)
    for name in ("api", "worker-gpu0"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"] and "healthcheck" in services["postgres"]
    assert (REPO / services["api"]["build"]["context"] / "Dockerfile").is_file()


def test_api_and_worker_share_stores_and_broker(compose):
    services = compose["services"]
    api_env, worker_env = _env(services["api"]), _env(services["worker-gpu0"])
    for key in ("ODEFORGE_DATABASE_URL", "ODEFORGE_BROKER_URL", "ODEFORGE_QUEUE", "ODEFORGE_ARTIFACT_DIR"):
        assert api_env[key] == worker_env[key], key
    assert api_env["ODEFORGE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in api_env["ODEFORGE_DATABASE_URL"]
    assert api_env["ODEFORGE_BROKER_URL"].startswith("redis://redis:6379")
    pg = _env(services["postgres"])
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@" in api_env["ODEFORGE_DATABASE_URL"]
    assert api_env["ODEFORGE_DATABASE_URL"].endswith("/" + pg["POSTGRES_DB"])
    # The artifact dir is one volume mounted at the same place in both containers.
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]} for name in ("api", "worker-gpu0")}
    art = api_env["ODEFORGE_ARTIFACT_DIR"]
    assert mounts["api"][art] == mounts["worker-gpu0"][art] and mounts["api"][art] in compose["volumes"]


def test_every_odeforge_variable_is_a_valid_setting(compose):
    for name in ("api", "worker-gpu0"):
        env = _env(compose["services"][name])
        fields = {k[len("ODEFORGE_"):].lower(): v for k, v in env.items() if k.startswith("ODEFORGE_")}
        unknown = set(fields) - set(Settings.model_fields)
        assert not unknown, f"{name}: unknown settings {unknown}"
        settings = Settings(**fields)  # validates (e.g. production refuses SQLite)
        assert settings.environment == "production"
        assert settings.visibility_timeout > settings.max_job_seconds


def test_gpu_worker_reserves_a_device_and_runs_the_worker_command(compose):
    worker = compose["services"]["worker-gpu0"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and "gpu" in devices[0]["capabilities"] and devices[0]["driver"] == "nvidia"
    assert _env(worker)["ODEFORGE_DEVICE"].startswith("cuda")
    commands = {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    assert worker["command"][:2] == ["odeforge", "worker"] and "worker" in commands
    api = compose["services"]["api"]
    assert api["command"][:2] == ["odeforge", "api"] and "api" in commands
    assert "8000:8000" in api["ports"] and "--port" in api["command"]
    assert api["command"][api["command"].index("--port") + 1] == "8000"


def test_the_image_holds_every_package_the_project_installs():
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert {"node_engine", "jobs", "service", "worker"} <= packages
    copied = {line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert packages <= copied, f"Dockerfile does not COPY {packages - copied}"
    assert all((REPO / p / "__init__.py").is_file() for p in packages)
