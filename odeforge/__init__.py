"""odeforge's Python client: ``odeforge.Client(url, api_key=...)`` over the HTTP API.

    import odeforge
    with odeforge.Client("http://127.0.0.1:8000", api_key=...) as c:
        job = c.submit({"model": {"type": "cnf"}, "dataset": {"name": "moons"}})
        job = c.wait(job["id"], progress=True)
        c.log_density(job["id"], [[0.0, 0.5]])

Light on purpose: ``httpx`` only (no FastAPI, no PyTorch), so it installs and imports anywhere.
"""

from odeforge.client import DEFAULT_URL, TERMINAL, Client
from odeforge.errors import OdeforgeError, ProblemError, RequestTimeout, ServiceUnreachable
from odeforge.sse import Event

__all__ = ["Client", "DEFAULT_URL", "Event", "OdeforgeError", "ProblemError", "RequestTimeout",
           "ServiceUnreachable", "TERMINAL"]
