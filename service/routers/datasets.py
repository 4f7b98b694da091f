"""``/v1/datasets``: upload an (N, D) array (``.npy`` or CSV) for density models, or time series (``?kind=series``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Path, Query, Response, UploadFile

from service.deps import CallerDep, JobServiceDep, SettingsDep
from service.routers.jobs import PROBLEMS
from service.schemas import DatasetPublic, DatasetsPublic, Problem, dataset_public

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic,
             responses={**PROBLEMS, 413: {"model": Problem, "description": "file too large"}})
def upload_dataset(
    file: Annotated[UploadFile, File(description="N x D array (.npy, CSV) or time series (long CSV, .npz)")],
    jobs: JobServiceDep,
    caller: CallerDep,
    kind: Annotated[Literal["array", "series"], Query(description="array: N x D points; series: time series")] = "array",
) -> DatasetPublic:
    """Validate and store a data set. ``kind=array`` (default): 2-D, numeric, finite, 10+ rows, no
    constant column; use it as ``{"dataset": {"name": "upload", "id": <id>}}``. ``kind=series``: long
    CSV ``series_id, t, y1, ..., yD`` (empty cell = missing) or ``.npz`` (``t`` (N, T), ``y`` (N, T, D),
    optional ``mask``); times strictly increasing per series; use it as
    ``{"dataset": {"name": "series_upload", "id": <id>}}``; its shape is (N, T, D).
    """
    dataset = jobs.upload_dataset(file.filename, file.file, caller, kind)
    return dataset_public(dataset)


# ---- listing and deleting uploads (issue 15) ------------------------------------------------------
@router.get("", response_model=DatasetsPublic, responses=PROBLEMS)
def list_datasets(
    jobs: JobServiceDep,
    caller: CallerDep,
    settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
    page_token: Annotated[str | None, Query(max_length=256)] = None,
) -> DatasetsPublic:
    """The caller's uploaded data sets, newest first (id, shape, kind, filename, created_at); follow
    ``next_page_token``."""
    limit = min(limit or settings.page_limit_default, settings.page_limit_max)
    page, token = jobs.list_datasets(caller, limit=limit, page_token=page_token)
    return DatasetsPublic(datasets=[dataset_public(d) for d in page], next_page_token=token)


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses={**PROBLEMS, 409: {"model": Problem, "description": "a queued or running job uses it"}})
def delete_dataset(dataset_id: Annotated[str, Path(max_length=64)], jobs: JobServiceDep, caller: CallerDep) -> Response:
    """Delete an upload (its row and file): 204. 409 while a queued or running job trains on it;
    404 for an unknown id or another API key's upload. Finished jobs keep their checkpoints."""
    jobs.delete_dataset(jobs.get_dataset(dataset_id, caller))
    return Response(status_code=204)
