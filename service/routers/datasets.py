"""``/v1/datasets``: upload an (N, D) array (``.npy`` or CSV) to train density models on."""

from __future__ import annotations

import io
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, UploadFile

from jobs.artifacts import dataset_key
from service.deps import ArtifactsDep, CallerDep, SettingsDep, StoreDep
from service.errors import ProblemError
from service.routers.jobs import PROBLEMS
from service.schemas import DatasetPublic, Problem

router = APIRouter(prefix="/datasets", tags=["datasets"])

_SUFFIXES = {".npy", ".csv", ".txt"}


def _bad(reason: str) -> ProblemError:
    return ProblemError(422, "invalid-dataset", reason, errors=[{"field": "file", "reason": reason}])


@router.post("", status_code=201, response_model=DatasetPublic,
             responses={**PROBLEMS, 413: {"model": Problem, "description": "file too large"}})
def upload_dataset(
    file: Annotated[UploadFile, File(description="N x D array: .npy (no pickles) or CSV (optional header)")],
    store: StoreDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> DatasetPublic:
    """Validate (2-D, numeric, finite, 10+ rows, no constant column) and store a data set.

    Use it in a job as ``{"dataset": {"name": "upload", "id": <id>}}``.
    """
    from node_engine.datasets.tabular import load_array  # the same validation the worker applies
    from node_engine.errors import DatasetError

    suffix = Path(file.filename or "").suffix.lower()
    if suffix not in _SUFFIXES:
        raise _bad(f"unsupported file type {suffix or '(none)'!r}; upload .npy or .csv")
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ProblemError(413, "upload-too-large", f"upload exceeds {settings.max_upload_bytes} bytes",
                           errors=[{"field": "file", "reason": f"larger than {settings.max_upload_bytes} bytes"}])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            array = load_array(path)
        except DatasetError as exc:
            raise _bad(str(exc)) from None
        except EOFError:  # np.load of an empty .npy (not a DatasetError in node_engine)
            raise _bad("empty or truncated file") from None
    dataset_id = uuid.uuid4().hex
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    artifacts.put(dataset_key(dataset_id), buf.getvalue())
    store.create_dataset(dataset_id, list(array.shape), (file.filename or "")[:255], owner=caller.owner)
    return DatasetPublic(id=dataset_id, shape=list(array.shape))
