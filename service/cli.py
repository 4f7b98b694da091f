"""The ``odeforge`` command line.

Run the service:
  odeforge serve [--host H] [--port P] [--data-dir DIR]   embedded: API + worker + private broker, SQLite
  odeforge api [--host H] [--port P]                       production API (ODEFORGE_* settings)
  odeforge worker [--device cuda:0]                        production worker (one per device)
Use it (every command takes --url / ODEFORGE_URL and --api-key / ODEFORGE_API_KEY; errors are one
line on stderr and exit code 1; all of it goes through ``odeforge.Client``):
  odeforge submit spec.json [--wait]    queue a job (and follow it with a progress bar)
  odeforge list | status JOB | wait JOB | cancel JOB | delete JOB
  odeforge logs JOB [-f] | events JOB   metric rows / the live event stream
  odeforge download JOB [NAME] | plot JOB NAME
  odeforge log-density JOB POINTS | samples JOB -n N | predict JOB INPUTS | forecast JOB REQUEST
  odeforge upload FILE | datasets list | datasets delete ID
  odeforge demo                         the README's main job, start to finish
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from odeforge import DEFAULT_URL, Client, OdeforgeError

app = typer.Typer(help="odeforge: train Neural ODEs and CNFs on request.", no_args_is_help=True,
                  add_completion=False)
console = Console()

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


# ---- using the service: every command goes through odeforge.Client ---------------------------
# ODEFORGE_URL / ODEFORGE_API_KEY are read when a command runs (click's envvar), not at import.
KeyOpt = typer.Option(None, "--api-key", envvar="ODEFORGE_API_KEY", show_default=False,
                      help="API key, sent as a bearer token (env ODEFORGE_API_KEY)")
JsonOpt = typer.Option(False, "--json", help="print the API's JSON")


class _InputError(Exception):
    """A command-line value the command cannot use (a file that does not parse, say)."""


@contextmanager
def _connect(url: str, api_key: Optional[str]) -> Iterator[Client]:
    """The client of a command; any error it raises ends the command with ONE line on stderr
    (``error: 404 job not found: ...``) and exit code 1 (2 for a bad command-line value), never a
    traceback."""
    try:
        with Client(url, api_key=api_key or "") as client:
            yield client
    except (OdeforgeError, TimeoutError, OSError) as exc:  # OSError: a file to read or write
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(1) from None
    except _InputError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(2) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_array(value: str, what: str) -> Any:
    """An array argument: a file (``.npy``, ``.csv``, ``.json``) or inline JSON (``'[[0, 1], [2, 3]]'``)."""
    path = Path(value)
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".csv", ".txt", ".json"):
            if not path.is_file():
                raise _InputError(f"{what}: no file {value}")
            if suffix == ".json":
                return json.loads(path.read_text())
            import numpy as np

            if suffix == ".npy":
                return np.load(path, allow_pickle=False).tolist()  # never unpickle a user's file
            return np.loadtxt(path, delimiter=",", ndmin=2).tolist()
        return json.loads(value)
    except (ValueError, OSError) as exc:
        raise _InputError(f"{what}: not a .npy/.csv/.json file or JSON array ({exc})") from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _fmt(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def _row_line(row: dict) -> str:
    """A metric row as one line: ``step=40 loss=1.2345 nfe_forward=26 ...``."""
    first = {"step": row["step"]} if "step" in row else {}
    return "  ".join(f"{k}={_fmt(v)}" for k, v in {**first, **row}.items() if v is not None)


_SHOWN_METRICS = ("num_parameters", "loss", "nfe_forward", "nfe_backward", "test_nll", "test_bits_per_dim",
                  "test_accuracy", "test_interp_mse", "test_extrap_mse", "elapsed_seconds")


def _print_job(job: dict) -> None:
    table = Table(title=f"job {job['id']}", show_header=False)
    table.add_row("status", job["status"])
    for key in ("name", "tags"):
        if job.get(key):
            table.add_row(key, ", ".join(job[key]) if isinstance(job[key], list) else str(job[key]))
    table.add_row("model", f"{job['spec']['model']['type']} on {job['spec']['dataset']['name']}")
    table.add_row("progress", f"{job['progress']:.0%} (step {job['step']}/{job['total_steps']})")
    m = job["metrics"]
    for k in _SHOWN_METRICS:
        if m.get(k) is not None:
            table.add_row(k, _fmt(m[k]))
    if job["error"]:
        table.add_row("error", f"{job['error']['type']}: {job['error']['detail']}")
    console.print(table)


@app.command()
def submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec (JSON)"),
    wait: bool = typer.Option(False, "--wait", help="follow the job with a progress bar until it ends"),
    name: Optional[str] = typer.Option(None, help="run name (replaces the spec's)"),
    tag: Optional[list[str]] = typer.Option(None, "--tag", help="run tag (repeat for several; replaces the spec's)"),
    init_from: Optional[str] = typer.Option(None, help="start from JOB's newest checkpoint, or JOB:CHECKPOINT"),
    idempotency_key: Optional[str] = typer.Option(None, help="Idempotency-Key header (safe retries)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Queue the job in SPEC; print its id (and with --wait its result; exit 1 unless it succeeded)."""
    try:
        body = json.loads(spec.read_text())
    except ValueError as exc:
        typer.echo(f"error: {spec}: not JSON ({exc})", err=True)
        raise typer.Exit(2) from None
    with _connect(url, api_key) as client:
        start = None
        if init_from:
            job_ref, _, checkpoint = init_from.partition(":")
            start = {"job": job_ref, "checkpoint": checkpoint or None}
        job = client.submit(body, name=name, tags=tag or None, init_from=start, idempotency_key=idempotency_key)
        console.print(f"job [bold]{job['id']}[/] {job['status']}")
        if wait:
            _finish(client.wait(job["id"], poll_s=0.5, progress=True))


def _finish(job: dict) -> None:
    """Print the final job; exit 1 unless it succeeded."""
    _print_job(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def status(job_id: str, url: str = UrlOpt, api_key: Optional[str] = KeyOpt, as_json: bool = JsonOpt) -> None:
    """Print a job's status, progress and latest metrics."""
    with _connect(url, api_key) as client:
        job = client.get(job_id)
    _print_json(job) if as_json else _print_job(job)


app.command("get", help="Print a job (same as status).")(status)


@app.command("list")
def list_jobs(
    status: Optional[str] = typer.Option(None, help="only jobs with this status (queued, running, ...)"),
    tag: Optional[str] = typer.Option(None, help="only jobs with this tag"),
    name: Optional[str] = typer.Option(None, help="only jobs with this name"),
    limit: int = typer.Option(20, help="at most this many jobs (0: all)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Your jobs, newest first: id, status, model, data set, name, progress, latest loss."""
    with _connect(url, api_key) as client:
        jobs = list(client.list(status=status, tag=tag, name=name, limit=limit or None))
    if as_json:
        _print_json(jobs)
        return
    table = Table("id", "status", "model", "dataset", "name", "tags", "progress", "loss", "created")
    for j in jobs:
        loss = j["metrics"].get("loss")
        table.add_row(j["id"], j["status"], j["spec"]["model"]["type"], j["spec"]["dataset"]["name"],
                      j.get("name") or "", ", ".join(j.get("tags") or []), f"{j['progress']:.0%}",
                      "" if loss is None else _fmt(loss), str(j["created_at"])[:19])
    console.print(table)


@app.command()
def wait(
    job_id: str,
    timeout: Optional[float] = typer.Option(None, help="give up after this many seconds (exit 1)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Follow a job with a progress bar until it ends; exit 1 unless it succeeded."""
    with _connect(url, api_key) as client:
        job = client.wait(job_id, timeout=timeout, poll_s=0.5, progress=True)
    _finish(job)


@app.command()
def cancel(job_id: str, url: str = UrlOpt, api_key: Optional[str] = KeyOpt) -> None:
    """Cancel a job (a running one stops between training steps)."""
    with _connect(url, api_key) as client:
        job = client.cancel(job_id)
    typer.echo(f"job {job['id']} {job['status']}" + (" (stopping)" if job["status"] == "running" else ""))


@app.command()
def delete(job_id: str, url: str = UrlOpt, api_key: Optional[str] = KeyOpt) -> None:
    """Delete a job (cancelled first if it runs) with its metrics, checkpoints and figures."""
    with _connect(url, api_key) as client:
        client.delete(job_id)
    typer.echo(f"job {job_id} deleted")


@app.command()
def logs(
    job_id: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing rows from the event stream until the job ends"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Print a job's metric rows (step, loss, NFE, test metrics), one line each; with -f follow the
    live event stream (training rows, evaluations, status changes) until the job ends."""
    with _connect(url, api_key) as client:
        rows = client.metrics(job_id)
        for row in rows:
            typer.echo(_row_line(row))
        if not follow:
            return
        last = rows[-1]["step"] if rows else -1
        for event in client.events(job_id):
            data = event.data if isinstance(event.data, dict) else {"data": event.data}
            if event.event in ("metric", "evaluation"):
                if isinstance(data.get("step"), int) and data["step"] <= last:
                    continue  # already printed from the history (which has evaluations merged in)
                typer.echo(_row_line(data))
            elif event.event == "status":
                typer.echo(f"# status {data.get('status')}")
            elif event.event == "checkpoint":
                typer.echo(f"# checkpoint {data.get('name')}")


@app.command()
def events(
    job_id: str,
    last_event_id: Optional[str] = typer.Option(None, help="resume after this event id"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Follow a job's event stream until it ends; one JSON object per event: {"id", "event", "data"}."""
    with _connect(url, api_key) as client:
        for event in client.events(job_id, last_event_id=last_event_id):
            typer.echo(json.dumps({"id": event.id, "event": event.event, "data": event.data}))


@app.command()
def download(
    job_id: str,
    name: Optional[str] = typer.Argument(None, help="checkpoint name (default: final, else the newest)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="file or folder to write to (default: JOB-NAME here)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Download a checkpoint (safetensors; serve it offline with node_engine.load_model(path))."""
    with _connect(url, api_key) as client:
        name = name or client.newest_checkpoint(job_id)
        path = client.download_checkpoint(job_id, name, _output(output, f"{job_id}-{name}"))
    typer.echo(str(path))


@app.command()
def plot(
    job_id: str,
    name: str = typer.Argument("training", help="training, density, samples or trajectories"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG or folder to write to (default: JOB-NAME.png here)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Download a job's figure as PNG."""
    with _connect(url, api_key) as client:
        path = client.plot(job_id, name, _output(output, f"{job_id}-{name}.png"))
    typer.echo(str(path))


def _output(output: Optional[Path], default_name: str) -> Path:
    """Where a download goes: ``output``, inside it when it is a folder, else ``default_name`` here."""
    if output is None:
        return Path(default_name)
    return output / default_name if output.is_dir() else output


@app.command("log-density")
def log_density(
    job_id: str,
    points: str = typer.Argument(..., help="(N, D) points: .npy/.csv/.json file or inline JSON '[[0, 0.5]]'"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """log p(x) in nats at POINTS (density jobs); prints the API's JSON."""
    with _connect(url, api_key) as client:
        _print_json(client.log_density(job_id, _load_array(points, "points")))


@app.command()
def samples(
    job_id: str,
    n: int = typer.Option(10, "-n", help="number of samples"),
    seed: int = typer.Option(0, help="sampling seed (same seed, same samples)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Draw N samples from a density job's model; prints the API's JSON."""
    with _connect(url, api_key) as client:
        _print_json(client.samples(job_id, n=n, seed=seed))


@app.command()
def predict(
    job_id: str,
    inputs: str = typer.Argument(..., help="(N, C, H, W) or (N, H, W) raw pixels: .npy/.json file or inline JSON"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Class probabilities of a classifier job for INPUTS (training data's pixel scale); prints JSON."""
    with _connect(url, api_key) as client:
        _print_json(client.predict(job_id, _load_array(inputs, "inputs")))


@app.command()
def forecast(
    job_id: str,
    request: str = typer.Argument(..., help='JSON file or inline JSON: {"series": [{"t": [...], "y": [[...]]}], "t": [...]}'),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Forecast time series with a time-series job at the requested times; prints JSON."""
    with _connect(url, api_key) as client:
        body = _load_array(request, "request")
        if not isinstance(body, dict) or "series" not in body or "t" not in body:
            raise _InputError('request: expected {"series": [...], "t": [...]}')
        _print_json(client.forecast(job_id, body["series"], body["t"], samples=body.get("samples")))


@app.command()
def upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help=".npy/.csv array, or .csv/.npz time series"),
    kind: str = typer.Option("array", help="array (N x D points) or series (time series)"),
    url: str = UrlOpt,
    api_key: Optional[str] = KeyOpt,
) -> None:
    """Upload a data set; prints its id and shape (use it as {"name": "upload", "id": ...})."""
    with _connect(url, api_key) as client:
        ds = client.upload(file, kind=kind)
    typer.echo(f"dataset {ds['id']} shape {ds['shape']}")


datasets_app = typer.Typer(help="Your uploaded data sets: list, delete (upload with `odeforge upload`).",
                           no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("list")
def datasets_list(url: str = UrlOpt, api_key: Optional[str] = KeyOpt, as_json: bool = JsonOpt) -> None:
    """Your uploads, newest first: id, kind, shape, file name, time."""
    with _connect(url, api_key) as client:
        items = list(client.datasets())
    if as_json:
        _print_json(items)
        return
    table = Table("id", "kind", "shape", "filename", "created")
    for d in items:
        table.add_row(d["id"], str(d.get("kind") or ""), " x ".join(map(str, d["shape"])), str(d.get("filename") or ""),
                      str(d.get("created_at") or "")[:19])
    console.print(table)


@datasets_app.command("delete")
def datasets_delete(dataset_id: str, url: str = UrlOpt, api_key: Optional[str] = KeyOpt) -> None:
    """Delete an upload (refused while a queued or running job trains on it)."""
    with _connect(url, api_key) as client:
        client.delete_dataset(dataset_id)
    typer.echo(f"dataset {dataset_id} deleted")


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
        with _connect(url, None) as client:
            _wait_ready(client, server)
            spec = json.loads(json.dumps(DEMO_SPEC))
            spec["training"]["iterations"] = iterations
            console.print("submitting: " + json.dumps(spec))
            job = client.wait(client.submit(spec)["id"], poll_s=0.5, progress=True)
            _print_job(job)
            if job["status"] != "succeeded":
                raise typer.Exit(1)
            # Top of the upper moon, bottom of the lower moon, the gap between them, far away.
            labelled = [("upper moon", [-1.0, 1.8]), ("lower moon", [1.0, -1.2]), ("between the moons", [0.0, 0.3]),
                        ("far away", [3.0, 3.0])]
            dens = client.log_density(job["id"], [p for _, p in labelled])
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
            console.print(f"3 samples: {client.samples(job['id'], n=3, seed=0)['samples']}")
            # Save the figures next to the data: the service (and its URLs) stop when the demo ends.
            plot_dir = data_dir / "plots" / job["id"]
            for name in ("training", "density", "samples"):
                client.plot(job["id"], name, plot_dir / f"{name}.png")
            console.print(f"plots: {plot_dir}/{{training,density,samples}}.png")
    finally:
        stop(server)


def _wait_ready(client: Client, server: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            typer.echo("error: the service exited during start-up; see serve.log", err=True)
            raise typer.Exit(1)
        try:
            client.ready()
            return
        except OdeforgeError:  # not listening yet, or 503 while the broker starts
            pass
        time.sleep(0.3)
    typer.echo("error: the service did not become ready", err=True)
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
