"""Process-level tuning of the API process: keep the garbage collector off the request path.

The API imports torch and node_engine (hundreds of thousands of long-lived objects). CPython's
full (generation 2) collections traverse all of them; under load, request bodies of thousands of
floats trigger such collections often, and each one stops every thread, ``/healthz`` included, for
a few hundred milliseconds on a small machine (measured with benchmarks/load.py: /healthz p99 of
about 300 ms under 50 concurrent log-density clients, about 30 ms with the startup heap frozen).
``gc.freeze()`` (Python 3.7+) moves everything alive at startup into a permanent
generation that collections skip; objects created later are still collected as usual.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Import the inference stack, collect once, freeze what is left. Returns the frozen object count."""
    import node_engine.inference  # noqa: F401 - torch, models, solvers: loaded now, frozen below

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
