"""``/v1/jobs/{id}/checkpoints``: list, download and delete (finished jobs) safetensors checkpoints."""

from __future__ import annotations

import re

from fastapi import APIRouter, Response

from jobs.artifacts import checkpoint_key, checkpoint_prefix
from service.deps import ArtifactsDep, JobDep, JobServiceDep
from service.errors import ProblemError
from service.routers.jobs import PROBLEMS
from service.schemas import CheckpointInfo, CheckpointsPublic, Problem

router = APIRouter(prefix="/jobs", tags=["checkpoints"])

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,100}\.safetensors$")


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic, responses=PROBLEMS)
def list_checkpoints(job: JobDep, artifacts: ArtifactsDep) -> CheckpointsPublic:
    """Checkpoints of a job (``step-000100.safetensors``, ..., ``final.safetensors``): the newest
    ``ODEFORGE_CHECKPOINT_KEEP`` periodic ones plus the final one (older ones are deleted as new ones
    land). Files that are not regular files inside the artifact directory (links) are not listed."""
    items = [
        CheckpointInfo(name=name, size_bytes=size, url=f"/v1/jobs/{job.id}/checkpoints/{name}")
        for name, size in artifacts.list(checkpoint_prefix(job.id))
        if _NAME.match(name)
    ]
    return CheckpointsPublic(checkpoints=items)


@router.get("/{job_id}/checkpoints/{name}", responses={**PROBLEMS, 200: {"content": {"application/octet-stream": {}}}})
def download_checkpoint(job: JobDep, name: str, artifacts: ArtifactsDep) -> Response:
    """The checkpoint file (safetensors: tensors + JSON metadata, loadable without pickle).

    404 ``checkpoint-not-found``: no such name, a checkpoint pruned by the retention, or one replaced
    by a link (links are never followed, so a link out of the artifact directory is never served).
    """
    missing = ProblemError(404, "checkpoint-not-found", f"job {job.id} has no checkpoint {name!r}")
    if not _NAME.match(name):
        raise missing
    try:
        data = artifacts.get(checkpoint_key(job.id, name))
    except FileNotFoundError:  # absent, pruned meanwhile, or a link
        raise missing from None
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{job.id}-{name}"'})


@router.delete("/{job_id}/checkpoints/{name}", status_code=204, response_class=Response,
               responses={**PROBLEMS, 409: {"model": Problem, "description": "the job is queued or running"}})
def delete_checkpoint(job: JobDep, name: str, jobs: JobServiceDep) -> Response:
    """Delete a checkpoint of a finished job (its bytes leave the owner's ``ODEFORGE_OWNER_QUOTA_BYTES``).
    409 ``job-active`` while the job is queued or running; 404 ``checkpoint-not-found``. Inference
    then answers from the newest checkpoint left (409 ``no-checkpoint`` when none is)."""
    if not _NAME.match(name):
        raise ProblemError(404, "checkpoint-not-found", f"job {job.id} has no checkpoint {name!r}")
    jobs.delete_checkpoint(job, name)
    return Response(status_code=204)
