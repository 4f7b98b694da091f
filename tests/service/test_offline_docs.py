"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) work without the internet: every script, style sheet
and icon their HTML references is served by the app itself (issue 15)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from jobs.settings import Settings
from service.app import create_app


@pytest.fixture
def client(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", broker_url="memory://",
                        artifact_dir=tmp_path / "artifacts")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("page, script", [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_docs_pages_reference_only_the_apps_own_files(client, page, script):
    resp = client.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert not re.search(r"(https?:)?//[A-Za-z0-9]", html), "an address outside the app"
    refs = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*'([^']+)'""", html)
    refs = [a or b for a, b in refs]
    assert any(r.endswith(script) for r in refs) and "/openapi.json" in refs
    for ref in refs:
        assert ref.startswith("/"), ref
        got = client.get(ref)
        assert got.status_code == 200 and len(got.content) > 1000, ref
    js = client.get(next(r for r in refs if r.endswith(script)))
    assert "javascript" in js.headers["content-type"]
