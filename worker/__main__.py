"""``python -m worker [--hostname NAME] [--loglevel LEVEL]``: one training worker process.

What ``odeforge worker`` runs (it sets ``ODEFORGE_DEVICE`` / ``ODEFORGE_QUEUE`` from its options
and replaces itself with this). One process, one job at a time: the solo pool, prefetch 1.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the Celery worker until it is stopped (SIGTERM: graceful)."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--hostname", default=None, help="Celery node name (default odeforge-DEVICE-PID@%%h)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)

    from jobs.settings import get_settings
    from worker.celery_app import worker_app

    settings = get_settings()
    hostname = args.hostname or f"odeforge-{settings.device}-{os.getpid()}@%h"
    worker_app().worker_main(["worker", "--pool", "solo", "--concurrency", "1", "--queues", settings.queue,
                              "--loglevel", args.loglevel, "--without-gossip", "--without-mingle",
                              "--hostname", hostname])


if __name__ == "__main__":
    main()
