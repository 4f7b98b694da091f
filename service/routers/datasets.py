"""``/v1/datasets``: upload an (N, D) array (``.npy`` or CSV) for density models, or time series (``?kind=series``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, UploadFile

from service.deps import CallerDep, JobServiceDep
from service.routers.jobs import PROBLEMS
from service.schemas import DatasetPublic, Problem

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
    return DatasetPublic(id=dataset.id, shape=list(dataset.shape))
