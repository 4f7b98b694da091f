"""The web dashboard: ``GET /`` (the page) and ``/dashboard/...`` (its script and style sheet).

Every asset ships in the package (``service/dashboard/``; nothing from a CDN), so the dashboard works
on a machine without internet. The page holds no data: it calls the ``/v1`` API from the browser
with the API key the user types (kept in ``sessionStorage``, sent as ``Authorization: Bearer``),
so these paths are public (``service.auth.PUBLIC_PREFIXES``) while every ``/v1`` call stays checked.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = files("service") / "dashboard"
#: where the dashboard's script and style sheet are served from
DASHBOARD_ASSETS = "/dashboard"


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard page at ``/`` and its assets under ``DASHBOARD_ASSETS``."""
    app.mount(DASHBOARD_ASSETS, StaticFiles(directory=str(ASSETS)), name="dashboard-assets")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        # no-cache: a new release's page must not pair with an old cached script
        return FileResponse(str(ASSETS / "index.html"), media_type="text/html",
                            headers={"Cache-Control": "no-cache"})
