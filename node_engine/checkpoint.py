"""Checkpoints as one ``.safetensors`` file: tensors plus JSON metadata in the header. Never pickle.

Layout of the tensors:

* ``model.<name>``: the model's ``state_dict``;
* ``optimizer.state.<param index>.<key>``: tensor entries of the optimizer's per-parameter state
  (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``); non-tensor entries and ``param_groups`` go to JSON;
* ``rng.<name>``: random-generator states as uint8 tensors (``torch.get_rng_state()`` format).

The header's ``__metadata__`` (string -> string, as safetensors requires) holds ``odeforge`` (the
JSON document: kind, spec, step, versions, dataset statistics, optimizer JSON, extra) and
``sha256``, a digest over that JSON and every tensor's name, dtype, shape and bytes. The digest
detects corruption and casual edits; it is not a signature (whoever can write the file can
recompute it), which is fine because loading never executes anything from the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from node_engine.errors import CheckpointError

FORMAT = "odeforge-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 2**20


@dataclass
class Checkpoint:
    """Everything a training run or an inference model needs, in memory.

    Attributes:
        kind: "density", "energy" or "classifier".
        spec: the job spec (JSON-ready mapping) the model was built from.
        step: optimizer steps taken (int).
        model_state: the model's state_dict (name -> tensor).
        optimizer_state: a torch optimizer ``state_dict()`` or None.
        rng_state: name -> uint8 tensor of a generator state.
        dataset: data-set information (name, dim, standardization, input_shape...).
        extra: further JSON-ready information (e.g. the last evaluation metrics).
        versions: library versions at save time (filled by :func:`save_checkpoint`).
    """

    kind: str
    spec: dict[str, Any]
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    try:
        from importlib.metadata import version

        odeforge = version("odeforge")
    except Exception:  # not installed as a distribution (running from a checkout)
        odeforge = "0.1.0"
    return {"odeforge": odeforge, "torch": torch.__version__, "numpy": np.__version__,
            "format_version": str(FORMAT_VERSION)}


def _digest(document: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(document.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{int(index)}.{key}"] = value
            else:
                scalars.setdefault(str(int(index)), {})[key] = value
    return tensors, {"param_groups": state.get("param_groups", []), "state_scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, _, index, key = name.split(".", 3)
        state.setdefault(int(index), {})[key] = value
    for index, entries in doc.get("state_scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for group in doc.get("param_groups", []):
        group = dict(group)
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)  # JSON turned tuples such as Adam's betas into lists
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(checkpoint: Checkpoint) -> bytes:
    """Serialize ``checkpoint`` to safetensors bytes with JSON metadata.

    Raises:
        CheckpointError: a value is not JSON-serializable or a tensor name contains a reserved prefix.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, value in checkpoint.model_state.items():
        tensors[f"model.{name}"] = value
    optimizer_doc = None
    if checkpoint.optimizer_state is not None:
        opt_tensors, optimizer_doc = _flatten_optimizer(checkpoint.optimizer_state)
        tensors.update(opt_tensors)
    for name, value in checkpoint.rng_state.items():
        if value.dtype != torch.uint8:
            raise CheckpointError(f"rng state {name!r} must be a uint8 tensor, got {value.dtype}")
        tensors[f"rng.{name}"] = value
    # safetensors refuses shared or non-contiguous storage: store independent copies
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": checkpoint.kind,
                "spec": checkpoint.spec, "step": int(checkpoint.step), "versions": _versions(),
                "dataset": checkpoint.dataset, "optimizer": optimizer_doc, "extra": checkpoint.extra}
    try:
        text = json.dumps(document, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON-serializable: {exc}") from exc
    return st_save(tensors, metadata={"odeforge": text, "sha256": _digest(text, tensors)})


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CheckpointError(f"not a checkpoint: {len(data)} bytes is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise CheckpointError("not a checkpoint: the safetensors header length is invalid (truncated or corrupted)")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupted checkpoint: unreadable safetensors header ({exc})") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or "odeforge" not in metadata or "sha256" not in metadata:
        raise CheckpointError("not an odeforge checkpoint: the safetensors header lacks odeforge metadata")
    return metadata


def load_checkpoint(data: bytes, *, kind: str | None = None) -> Checkpoint:
    """Parse and verify checkpoint bytes. Nothing is unpickled or executed.

    Args:
        data: bytes produced by :func:`save_checkpoint`.
        kind: if given, the checkpoint must be of this kind.

    Raises:
        CheckpointError: truncated/corrupted bytes, digest mismatch (modified file), an unknown
            format version, or a kind other than ``kind``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CheckpointError(f"checkpoint must be bytes, got {type(data).__name__}")
    data = bytes(data)
    metadata = _read_metadata(data)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed buffers
        raise CheckpointError(f"corrupted checkpoint: {exc}") from exc
    text = metadata["odeforge"]
    if _digest(text, tensors) != metadata["sha256"]:
        raise CheckpointError("checkpoint digest mismatch: the file was modified or corrupted after it was saved")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupted checkpoint metadata: {exc}") from exc
    if document.get("format") != FORMAT:
        raise CheckpointError(f"not an odeforge checkpoint (format {document.get('format')!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {document.get('format_version')} is not supported "
                              f"(this odeforge reads version {FORMAT_VERSION})")
    if kind is not None and document.get("kind") != kind:
        raise CheckpointError(f"checkpoint holds a {document.get('kind')!r} model, expected {kind!r}")
    model = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    rng = {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")}
    optimizer = None
    if document.get("optimizer") is not None:
        opt = {name: t for name, t in tensors.items() if name.startswith("optimizer.state.")}
        optimizer = _unflatten_optimizer(opt, document["optimizer"])
    return Checkpoint(kind=document["kind"], spec=document["spec"], step=int(document["step"]),
                      model_state=model, optimizer_state=optimizer, rng_state=rng,
                      dataset=document.get("dataset", {}), extra=document.get("extra", {}),
                      versions=document.get("versions", {}))


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=True)`` with shape checks, as CheckpointError.

    Raises:
        CheckpointError: missing/unexpected keys or shape mismatches (the checkpoint belongs to another model).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)
