"""The ``odeforge`` command line.

Run the service:
  odeforge serve [--host H] [--port P] [--data-dir DIR]   embedded: API + worker + private broker, SQLite
  odeforge api [--host H] [--port P]                       production API (ODEFORGE_* settings)
  odeforge worker [--device cuda:0]                        production worker (one per device)
Use it:
  odeforge submit spec.json [--wait]    queue a job (and follow it with a progress bar)
  odeforge status JOB_ID                print a job
  odeforge demo                         the README's main job, start to finish
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs.status import TERMINAL, JobStatus

app = typer.Typer(help="odeforge: train Neural ODEs and CNFs on request.", no_args_is_help=True,
                  add_completion=False)
console = Console()

DEFAULT_URL = "http://127.0.0.1:8000"
# ODEFORGE_URL is read when a command runs (click's envvar), not when this module is imported.
UrlOpt = typer.Option(DEFAULT_URL, "--url", envvar="ODEFORGE_URL", help="base URL of the API (env ODEFORGE_URL)")

# The README's main job: a small FFJORD-style CNF on the two-moons data set.
DEMO_SPEC: dict[str, Any] = {
    "model": {"type": "cnf", "hidden_dims": [32, 32], "nonlinearity": "tanh"},
    "dataset": {"name": "moons", "n_samples": 4000},
    "solver": {"method": "dopri5", "rtol": 1e-4, "atol": 1e-4, "adjoint": True},
    "training": {"iterations": 200, "batch_size": 256, "lr": 1e-2, "eval_every": 50, "checkpoint_every": 50},
}


# ---- running the service ------------------------------------------------------------------------
@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port of the API"),
    data_dir: Path = typer.Option(Path("odeforge-data"), help="job store, artifacts and broker data"),
) -> None:
    """Embedded service: API, one worker and a private Redis broker; all data under DATA_DIR.

    The worker and the broker are supervised: one that dies is restarted (logged with its exit code)
    after a backoff, at most ODEFORGE_SUPERVISE_MAX_RESTARTS times a minute (service.embedded).
    """
    import logging

    from jobs.settings import Settings
    from service.embedded import Child, EmbeddedBroker, Supervisor, embedded_env, spawn

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if not logging.getLogger("odeforge.serve").handlers:  # supervision events on stderr, next to uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("odeforge.serve").addHandler(handler)
        logging.getLogger("odeforge.serve").setLevel(logging.INFO)
    broker = EmbeddedBroker(data_dir)
    os.environ.update(embedded_env(data_dir, broker.url))
    settings = Settings()
    limits = dict(backoff_s=settings.supervise_backoff_s, max_restarts=settings.supervise_max_restarts)
    children = [Child("redis-server", broker.start, **limits),
                Child("worker", lambda: spawn([sys.executable, "-m", "worker"], dict(os.environ),
                                              data_dir / "worker.log"), **limits)]
    supervisor = Supervisor(children)
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down; turning that into
    # SystemExit lets the `finally` below stop the worker and then the broker in order.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for child in children:
            child.start()
        supervisor.start()
        console.print(f"[bold]odeforge[/] serving on http://{host}:{port}  (data: {data_dir}, worker log: "
                      f"{data_dir / 'worker.log'})")
        _run_api(host, port)
    finally:
        supervisor.shutdown()  # no more restarts; then the worker, then the broker


def _run_api(host: str, port: int) -> None:
    import uvicorn

    from jobs.settings import Settings
    from service.app import create_app

    uvicorn.run(create_app(Settings()), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


@app.command()
def api(
    host: str = typer.Option("0.0.0.0", help="interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
) -> None:
    """The HTTP API alone (production: ODEFORGE_DATABASE_URL, ODEFORGE_BROKER_URL, ...)."""
    _run_api(host, port)


@app.command()
def worker(
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (default ODEFORGE_DEVICE)"),
    queue: Optional[str] = typer.Option(None, help="queue to consume (default ODEFORGE_QUEUE)"),
    name: Optional[str] = typer.Option(None, help="Celery node name"),
    loglevel: str = typer.Option("INFO", help="log level"),
) -> None:
    """A training worker: one process, one job at a time (start one per GPU with --device cuda:N).

    This process becomes ``python -m worker`` (same pid, so signals reach the worker): the API
    package never imports the worker's code.
    """
    if device:
        os.environ["ODEFORGE_DEVICE"] = device
    if queue:
        os.environ["ODEFORGE_QUEUE"] = queue
    argv = [sys.executable, "-m", "worker", "--loglevel", loglevel] + (["--hostname", name] if name else [])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


# ---- using the service --------------------------------------------------------------------------
def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60.0)


def _fail(resp: httpx.Response) -> None:
    try:
        body = resp.json()
        msg = body.get("detail") or body
    except ValueError:
        msg = resp.text
    console.print(f"[red]HTTP {resp.status_code}[/]: {msg}")
    raise typer.Exit(1)


def follow(client: httpx.Client, job_id: str, poll_s: float = 0.5) -> dict:
    """Poll a job with a progress bar until it ends; returns the final job."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=1.0, info=JobStatus.QUEUED.value)
        while True:
            resp = client.get(f"/v1/jobs/{job_id}")
            if resp.status_code != 200:
                _fail(resp)
            job = resp.json()
            m = job["metrics"]
            info = job["status"]
            if "loss" in m:
                info += f"  step {job['step']}/{job['total_steps']}  loss {m['loss']:.3f}"
            if m.get("nfe_forward") is not None:
                info += f"  NFE {m.get('nfe_forward')}/{m.get('nfe_backward')}"
            progress.update(task, completed=job["progress"], info=info)
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll_s)


@app.command()
def submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec (JSON)"),
    wait: bool = typer.Option(False, "--wait", help="follow the job with a progress bar until it ends"),
    idempotency_key: Optional[str] = typer.Option(None, help="Idempotency-Key header (safe retries)"),
    url: str = UrlOpt,
) -> None:
    """Queue the job in SPEC; print its id (and with --wait its result)."""
    body = json.loads(spec.read_text())
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(url) as client:
        resp = client.post("/v1/jobs", json=body, headers=headers)
        if resp.status_code != 202:
            _fail(resp)
        job = resp.json()
        console.print(f"job [bold]{job['id']}[/] {job['status']}")
        if wait:
            job = follow(client, job["id"])
            _print_job(job)
            if job["status"] != JobStatus.SUCCEEDED:
                raise typer.Exit(1)


_SHOWN_METRICS = ("num_parameters", "loss", "nfe_forward", "nfe_backward", "test_nll", "test_bits_per_dim",
                  "test_accuracy", "elapsed_seconds")


def _print_job(job: dict) -> None:
    table = Table(title=f"job {job['id']}", show_header=False)
    table.add_row("status", job["status"])
    table.add_row("progress", f"{job['progress']:.0%} (step {job['step']}/{job['total_steps']})")
    m = job["metrics"]
    for k in _SHOWN_METRICS:
        if m.get(k) is not None:
            table.add_row(k, f"{m[k]:.5g}" if isinstance(m[k], float) else str(m[k]))
    if job["error"]:
        table.add_row("error", f"{job['error']['type']}: {job['error']['detail']}")
    console.print(table)


@app.command()
def status(job_id: str, url: str = UrlOpt, as_json: bool = typer.Option(False, "--json", help="raw JSON")) -> None:
    """Print a job's status, progress and latest metrics."""
    with _client(url) as client:
        resp = client.get(f"/v1/jobs/{job_id}")
        if resp.status_code != 200:
            _fail(resp)
        if as_json:
            console.print_json(resp.text)
        else:
            _print_job(resp.json())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@app.command()
def demo(
    data_dir: Path = typer.Option(Path("odeforge-data"), help="where the embedded service keeps its data"),
    port: int = typer.Option(0, help="API port (0: a free one)"),
    iterations: int = typer.Option(DEMO_SPEC["training"]["iterations"], help="training iterations"),
) -> None:
    """Start the embedded service, train a CNF on two moons, then query log-densities and samples."""
    from service.embedded import spawn, stop

    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"starting the embedded service on {url} (log: {data_dir / 'serve.log'})")
    server = spawn([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
                   dict(os.environ), data_dir / "serve.log")
    try:
        with _client(url) as client:
            _wait_ready(client, server)
            spec = json.loads(json.dumps(DEMO_SPEC))
            spec["training"]["iterations"] = iterations
            console.print("submitting: " + json.dumps(spec))
            resp = client.post("/v1/jobs", json=spec)
            if resp.status_code != 202:
                _fail(resp)
            job = follow(client, resp.json()["id"])
            _print_job(job)
            if job["status"] != JobStatus.SUCCEEDED:
                raise typer.Exit(1)
            # Top of the upper moon, bottom of the lower moon, the gap between them, far away.
            labelled = [("upper moon", [-1.0, 1.8]), ("lower moon", [1.0, -1.2]), ("between the moons", [0.0, 0.3]),
                        ("far away", [3.0, 3.0])]
            points = [p for _, p in labelled]
            resp = client.post(f"/v1/jobs/{job['id']}/log-density", json={"points": points})
            if resp.status_code != 200:
                _fail(resp)
            dens = resp.json()
            table = Table(title=f"log p(x) in nats (NFE {dens['nfe']})")
            table.add_column("x")
            table.add_column("where")
            table.add_column("log p(x)", justify="right")
            for (where, p), lp in zip(labelled, dens["log_density"]):
                table.add_row(str(p), where, "-inf" if lp is None else f"{lp:.3f}")
            console.print(table)
            m = job["metrics"]
            if "test_nll" in m:
                console.print(f"test NLL: [bold]{m['test_nll']:.4f}[/] nats"
                              + (f" ({m['test_bits_per_dim']:.4f} bits/dim)" if "test_bits_per_dim" in m else ""))
            sample = client.post(f"/v1/jobs/{job['id']}/samples", json={"n": 3, "seed": 0}).json()
            console.print(f"3 samples: {sample.get('samples')}")
            # Save the figures next to the data: the service (and its URLs) stop when the demo ends.
            plot_dir = data_dir / "plots" / job["id"]
            plot_dir.mkdir(parents=True, exist_ok=True)
            for name in ("training", "density", "samples"):
                png = client.get(f"/v1/jobs/{job['id']}/plots/{name}.png")
                if png.status_code != 200:
                    _fail(png)
                (plot_dir / f"{name}.png").write_bytes(png.content)
            console.print(f"plots: {plot_dir}/{{training,density,samples}}.png")
    finally:
        stop(server)


def _wait_ready(client: httpx.Client, server: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            console.print("[red]the service exited during start-up; see serve.log[/]")
            raise typer.Exit(1)
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    console.print("[red]the service did not become ready[/]")
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
