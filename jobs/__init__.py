"""The jobs layer: what the API (``service``) and the workers (``worker``) share, below both.

- :mod:`jobs.settings`  ``Settings`` (``ODEFORGE_*``) and the cached ``get_settings()``
- :mod:`jobs.status`    ``JobStatus``, the states of a job
- :mod:`jobs.tables`    SQLAlchemy tables of the job store and the engine factory
- :mod:`jobs.leases`    claims, the fencing predicate, the lease heartbeat, the reconciler
- :mod:`jobs.store`     ``JobStore``: every read and write of job state
- :mod:`jobs.artifacts` the artifact store (checkpoints, uploads) and its keys
- :mod:`jobs.queue`     the Celery app factory, the training task's name, the publisher

``service`` and ``worker`` import this package and never each other; it imports neither of them,
nor ``node_engine``. Importing it reads nothing from the environment
(``tests/test_layers.py`` checks both).
"""
