"""One router per resource, gathered in :func:`api_router`."""

from fastapi import APIRouter

from service.routers import checkpoints, datasets, health, inference, jobs, metrics, plots


def api_router() -> APIRouter:
    router = APIRouter()
    router.include_router(health.router)
    for module in (jobs, metrics, checkpoints, plots, inference, datasets):
        router.include_router(module.router, prefix="/v1")
    return router
