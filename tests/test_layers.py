"""The package layering: node_engine <- jobs <- {service, worker}, the HTTP client ``odeforge`` beside
them (imports none of them; only the CLI in service uses it), and nothing read at import time.

``service`` (the API) and ``worker`` (Celery) share what they share through ``jobs`` and never
import each other; ``jobs`` imports neither, nor ``node_engine``; ``node_engine`` imports none of
the three. Read from the source (every import statement, also inside functions, and every
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name), so a new module
cannot slip a forbidden import in. A second test imports the layers in a fresh interpreter with
invalid ``ODEFORGE_*`` values: importing must succeed, reading the settings must fail.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the top-level packages of this repository it must never import
FORBIDDEN = {
    "odeforge": {"node_engine", "jobs", "service", "worker"},  # the HTTP client: talks to the API only
    "node_engine": {"jobs", "service", "worker", "odeforge"},
    "jobs": {"service", "worker", "node_engine", "odeforge"},
    "service": {"worker"},
    "worker": {"service", "odeforge"},
}


def imported_packages(path: Path, package: str) -> dict[str, int]:
    """Top-level package of every module ``path`` imports -> first line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        found.setdefault(name.split(".")[0], line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            add(package if node.level else (node.module or ""), node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                add(node.args[0].value, node.lineno)
    return found


def violations(repo: Path) -> list[str]:
    out = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((repo / package).rglob("*.py"))
        assert files, f"no package {package!r} in {repo}"
        for path in files:
            for name, line in imported_packages(path, package).items():
                if name in forbidden:
                    out.append(f"{path.relative_to(repo)}:{line} imports {name}")
    return out


def test_service_and_worker_meet_only_in_jobs():
    assert violations(REPO) == []


def test_the_import_check_sees_imports_inside_functions_and_by_name(tmp_path):
    for package in FORBIDDEN:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "service" / "late.py").write_text("def f():\n    from worker.tasks import train\n")
    (tmp_path / "jobs" / "named.py").write_text("import importlib\nimportlib.import_module('service.app')\n")
    (tmp_path / "node_engine" / "rel.py").write_text("from . import x\nimport jobs.store as s\n")
    assert violations(tmp_path) == ["node_engine/rel.py:2 imports jobs", "jobs/named.py:2 imports service",
                                    "service/late.py:2 imports worker"]


_PROBE = """
import json, sys
import jobs, jobs.artifacts, jobs.leases, jobs.queue, jobs.settings, jobs.status, jobs.store, jobs.tables
import service.app, service.cli
api_modules = sorted(m for m in sys.modules if m.split(".")[0] == "worker")
import worker.__main__, worker.celery_app, worker.runner, worker.tasks
from jobs.settings import get_settings
try:
    get_settings()
    error = None
except Exception as exc:
    error = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"api_modules": api_modules, "error": error}))
"""


def test_importing_the_layers_reads_no_setting():
    """Invalid settings in the environment: every layer imports, the first get_settings() refuses them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODEFORGE_")}
    env.update(ODEFORGE_LEASE_S="not-a-number", ODEFORGE_ENVIRONMENT="junk", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["api_modules"] == []  # the API process never loads the worker's code
    assert result["error"] is not None and "ValidationError" in result["error"]
    assert "lease_s" in result["error"] and "environment" in result["error"]


def test_settings_getter_is_cached_and_can_be_overridden(monkeypatch):
    from jobs.settings import Settings, get_settings, override_settings

    monkeypatch.setenv("ODEFORGE_QUEUE", "first")
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings() and get_settings().queue == "first"
        monkeypatch.setenv("ODEFORGE_QUEUE", "second")
        assert get_settings().queue == "first"  # read once
        with override_settings(Settings(queue="override")) as s:
            assert get_settings() is s
        assert get_settings().queue == "first"
        get_settings.cache_clear()
        assert get_settings().queue == "second"
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("unsafe, variable", [
    ({"database_url": "sqlite:///jobs.db"}, "ODEFORGE_DATABASE_URL"),
    ({"broker_url": "memory://"}, "ODEFORGE_BROKER_URL"),
    ({"artifact_dir": "data/artifacts"}, "ODEFORGE_ARTIFACT_DIR"),
])
def test_production_refuses_what_only_works_in_one_process(unsafe, variable):
    from pydantic import ValidationError

    from jobs.settings import Settings

    safe = dict(environment="production", database_url="postgresql+psycopg://u:p@db/odeforge",
                broker_url="redis://redis:6379/0", artifact_dir="/data/artifacts")
    Settings(**safe)
    with pytest.raises(ValidationError, match=variable):
        Settings(**{**safe, **unsafe})
    Settings(**{**safe, **unsafe, "environment": "development"})  # fine on one machine
