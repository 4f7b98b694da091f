"""A wall clock for benchmarks on any device: on CUDA, ``now()`` first waits for the queued
kernels, so an interval covers the work launched inside it, not just its launch."""

from __future__ import annotations

import time

import torch

_cuda = False


def use_device(name: str) -> torch.device:
    """The benchmark's device ("cpu", "cuda", "cuda:N"); raises ValueError if CUDA is absent."""
    global _cuda
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    _cuda = dev.type == "cuda"
    return dev


def now() -> float:
    """Seconds (perf_counter) after the device is idle."""
    if _cuda:
        torch.cuda.synchronize()
    return time.perf_counter()
