"""``/v1/datasets``: upload an (N, D) array (``.npy`` or CSV) to train density models on."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from service.deps import CallerDep, JobServiceDep
from service.routers.jobs import PROBLEMS
from service.schemas import DatasetPublic, Problem

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic,
             responses={**PROBLEMS, 413: {"model": Problem, "description": "file too large"}})
def upload_dataset(
    file: Annotated[UploadFile, File(description="N x D array: .npy (no pickles) or CSV (optional header)")],
    jobs: JobServiceDep,
    caller: CallerDep,
) -> DatasetPublic:
    """Validate (2-D, numeric, finite, 10+ rows, no constant column) and store a data set.

    Use it in a job as ``{"dataset": {"name": "upload", "id": <id>}}``.
    """
    dataset = jobs.upload_dataset(file.filename, file.file, caller)
    return DatasetPublic(id=dataset.id, shape=list(dataset.shape))
