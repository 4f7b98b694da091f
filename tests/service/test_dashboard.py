"""The web dashboard (``GET /``) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver`` packages, driven by Selenium), against a real server (uvicorn in a thread) whose
jobs are trained by the worker's own code (``worker.runner.run_job``).

What the page shows is checked against the API's own answers (``GET /v1/jobs``, ``/metrics``, the
422 problem body), read here with httpx, not against the dashboard's code. Skipped, with the reason,
where no Chromium is installed (``.ci/run`` installs it). With ``ODEFORGE_DASHBOARD_SCREENSHOTS=<dir>``
each page is saved there as ``dashboard_<page>.png`` (the README's figures come from this).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from tests.service.test_events import ALICE, live_api, worker  # noqa: F401  (live_api: the server fixture)
from worker.runner import run_job

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
except ImportError:  # the browser tests skip, saying why
    webdriver = None

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = ("selenium is not installed (pip install -e '.[test]')" if webdriver is None else
              None if CHROMIUM and CHROMEDRIVER else
              "no headless browser: apt-get install -y chromium chromium-driver (.ci/run does)")
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")

SCREENSHOTS = os.environ.get("ODEFORGE_DASHBOARD_SCREENSHOTS")


def tiny_spec(name: str, iterations: int = 6, lr: float = 1e-3, tags: tuple[str, ...] = ("dash",)) -> dict:
    return {"model": {"type": "mlp", "hidden": 8}, "dataset": {"name": "digits", "n_samples": 200},
            "training": {"iterations": iterations, "batch_size": 32, "lr": lr, "eval_every": 3,
                         "checkpoint_every": 3, "log_every": 1},
            "name": name, "tags": list(tags)}


@pytest.fixture(scope="module")
def browser() -> Iterator["webdriver.Chrome"]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # the element is not there yet, or was just redrawn
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def shot(browser, page: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(SCREENSHOTS) / f"dashboard_{page}.png"))


def points(browser, canvas_id: str) -> int:
    """How many points the chart ``canvas_id`` draws (the page records it on the canvas)."""
    return int(browser.find_element(By.ID, canvas_id).get_attribute("data-points") or -1)


@needs_browser
@pytest.mark.slow
def test_the_list_shows_jobs_and_filters_them_by_tag_and_name(browser, live_api):
    base, settings = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        first = client.post("/v1/jobs", json=tiny_spec("alpha run", tags=("red",))).json()["id"]
        second = client.post("/v1/jobs", json=tiny_spec("beta run", tags=("blue",))).json()["id"]
        assert run_job(first, worker(settings)) == "succeeded"
        listed = {j["id"]: j for j in client.get("/v1/jobs").json()["jobs"]}
    browser.get(f"{base}/")
    row = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{first}"]'), what="the job's row")
    wait_for(lambda: "succeeded" in row.text, what="the finished status")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1:6] == ["alpha run", "succeeded", "mlp", "digits", "red"]
    assert f"{listed[first]['step']}/{listed[first]['total_steps']}" in cells[6]
    shown_loss = float(re.search(r"loss (\S+?)(,|$)", cells[7]).group(1))  # the latest loss, as the API lists it
    assert shown_loss == pytest.approx(listed[first]["metrics"]["loss"], rel=1e-3)
    assert browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{second}"]').text.split()[2] == "queued"
    shot(browser, "list")

    browser.find_element(By.ID, "filter-tag").send_keys("blue")
    wait_for(lambda: [r.get_attribute("data-job") for r in browser.find_elements(By.CSS_SELECTOR, "#runs tr")] == [second],
             what="only the blue run")
    browser.find_element(By.ID, "filter-tag").clear()
    browser.find_element(By.ID, "filter-name").send_keys("ALPHA")  # case-insensitive substring
    wait_for(lambda: [r.get_attribute("data-job") for r in browser.find_elements(By.CSS_SELECTOR, "#runs tr")] == [first],
             what="only the alpha run")


@needs_browser
@pytest.mark.slow
def test_a_job_submitted_through_the_form_appears_and_its_curves_grow_while_it_trains(browser, live_api):
    base, settings = live_api
    browser.get(f"{base}/#/submit")
    editor = wait_for(lambda: browser.find_element(By.ID, "spec-editor"), what="the spec editor")
    assert json.loads(editor.get_attribute("value"))["model"]["type"] == "cnf"  # the demo preset comes first
    browser.execute_script("arguments[0].value = arguments[1]", editor, json.dumps(tiny_spec("from the form", 40)))
    browser.find_element(By.ID, "submit").click()
    wait_for(lambda: "#/run/" in browser.current_url, what="the run page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    with httpx.Client(base_url=base, timeout=30) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["name"] == "from the form" and job["status"] == "queued"

        seen: list[int] = []  # loss points drawn while the worker trains
        done = threading.Event()
        trainer = threading.Thread(target=lambda: (run_job(job_id, worker(settings)), done.set()))
        trainer.start()
        while not done.is_set():
            seen.append(points(browser, "chart-loss"))
            time.sleep(0.03)
        trainer.join()
        rows = client.get(f"/v1/jobs/{job_id}/metrics").json()["history"]
        assert len(rows) == 40
        assert any(0 < n < 40 for n in seen), f"no partial curve drawn during training: {sorted(set(seen))}"
        assert seen == sorted(seen), "the curve shrank"
        wait_for(lambda: points(browser, "chart-loss") == 40, what="all 40 loss points")
        evaluations = [r for r in rows if "test_accuracy" in r]
        assert points(browser, "chart-test") == 2 * len(evaluations)  # test_accuracy and test_loss
        assert points(browser, "chart-nfe") == 2 * 40  # NFE forward and backward per step
        wait_for(lambda: browser.find_element(By.ID, "run-status").text == "succeeded", what="the final status")
        names = [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["checkpoints"]]
        wait_for(lambda: sorted(a.text for a in browser.find_elements(By.CSS_SELECTOR, "#checkpoints a")) == sorted(names),
                 what="the checkpoint links")
        browser.execute_script("document.getElementById('figures').scrollIntoView()")  # rendered when in view
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#figures img"), what="the training figure")
        browser.execute_script("window.scrollTo(0, 0)")
        shot(browser, "run")
        # the classifier's query: the page's class probability equals the API's for the same image
        images = json.loads(browser.find_element(By.ID, "query-inputs").get_attribute("value"))
        probs = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": images}).json()["probabilities"]
        browser.find_element(By.ID, "query-run").click()
        assert query_table(browser) == pytest.approx([max(p) for p in probs], rel=1e-12)

    browser.get(f"{base}/#/")
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]'), what="the submitted job in the list")


@needs_browser
@pytest.mark.slow
def test_compare_shows_both_runs_and_their_spec_differences(browser, live_api):
    base, settings = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        ids = [client.post("/v1/jobs", json=tiny_spec(name, iterations=n, lr=lr)).json()["id"]
               for name, n, lr in (("slow lr", 6, 1e-3), ("fast lr", 9, 1e-2))]
        for job_id in ids:
            assert run_job(job_id, worker(settings)) == "succeeded"
        n_rows = sum(len(client.get(f"/v1/jobs/{i}/metrics").json()["history"]) for i in ids)
    browser.get(f"{base}/")
    for job_id in ids:
        wait_for(lambda: browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"] input.select'), what="a row").click()
    browser.find_element(By.ID, "compare-selected").click()
    table = wait_for(lambda: browser.find_element(By.ID, "spec-diff"), what="the spec differences")
    runs = browser.find_element(By.ID, "compare-runs").text
    assert "slow lr" in runs and "fast lr" in runs
    rows = {tr.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")[1:]]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert rows["training.lr"] == ["0.001", "0.01"] and rows["training.iterations"] == ["6", "9"]
    assert rows["name"] == ['"slow lr"', '"fast lr"']
    assert "model.type" not in rows  # equal fields are not listed
    assert points(browser, "compare-loss") == n_rows == 6 + 9
    shot(browser, "compare")


def set_editor(browser, element, text: str) -> None:
    """Replace a textarea's text the way typing does (the page listens to ``input``)."""
    browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                           element, text)


def record_posts(browser) -> None:
    """From now on the page's fetch() POSTs are recorded in ``window.posted`` (the page's own fetch still runs)."""
    browser.execute_script("""
        window.posted = [];
        const f = window.fetch;
        window.fetch = (url, init) => { if (init && init.method === "POST") window.posted.push(String(url)); return f(url, init); };""")


def shown_problems(browser, selector: str) -> set[tuple[str, ...]]:
    items = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f"{selector} li.problem"), what=f"the problems in {selector}")
    return {tuple(li.text.split(": ", 1)) for li in items}


@needs_browser
@pytest.mark.slow
def test_a_bad_spec_shows_each_field_and_its_reason(browser, live_api):
    base, _ = live_api
    bad = tiny_spec("bad")
    bad["training"]["iterations"] = 0
    bad["solver"] = {"method": "no-such-method", "rtol": -1e-3}
    schema_ok_but_refused = tiny_spec("unknown data")  # the schema allows any name; the server knows the registry
    schema_ok_but_refused["dataset"]["name"] = "no-such-data"
    with httpx.Client(base_url=base, timeout=30) as client:
        answer = client.post("/v1/jobs", json=bad)
        refused = client.post("/v1/jobs", json=schema_ok_but_refused)
    assert answer.status_code == 422 and refused.status_code == 422
    expected = {e["field"] for e in answer.json()["errors"]}
    assert expected == {"training.iterations", "solver.method", "solver.rtol"}
    browser.get(f"{base}/#/submit")
    wait_for(lambda: browser.find_element(By.ID, "spec-ok"), what="the demo preset passing the schema check")
    record_posts(browser)
    editor = browser.find_element(By.ID, "spec-editor")
    set_editor(browser, editor, json.dumps(bad, indent=2))
    shown = shown_problems(browser, "#spec-check")  # as typed, before anything is sent
    assert {field for field, _ in shown} == expected  # the fields the server names, found in the browser
    reasons = dict(shown)
    assert reasons["solver.rtol"] == "must be > 0" and reasons["training.iterations"] == "must be ≥ 1"
    assert '"no-such-method" is not one of' in reasons["solver.method"] and '"dopri5"' in reasons["solver.method"]
    browser.find_element(By.ID, "submit").click()
    time.sleep(0.2)  # a click that sent something would have recorded it by now
    assert browser.execute_script("return window.posted") == []
    shot(browser, "submit_error")

    # where the schema check passes and the server disagrees, the server's 422 is shown field by field
    set_editor(browser, editor, json.dumps(schema_ok_but_refused, indent=2))
    wait_for(lambda: browser.find_element(By.ID, "spec-ok"), what="the schema check passing")
    browser.find_element(By.ID, "submit").click()
    assert shown_problems(browser, "#submit-result") == {(e["field"], e["reason"]) for e in refused.json()["errors"]}
    assert browser.execute_script("return window.posted") == ["v1/jobs"]
    assert "#/submit" in browser.current_url  # nothing was created
    for preset in browser.find_elements(By.CSS_SELECTOR, "#preset option"):  # every preset passes the schema
        preset.click()
        wait_for(lambda: browser.find_element(By.ID, "spec-ok"), what=f"preset {preset.text!r} passing")


def query_table(browser) -> list[float]:
    """The numbers the query panel shows (its cells carry the value it was given)."""
    cells = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#query-table td[data-value]"), what="the answer")
    return [float(c.get_attribute("data-value")) for c in cells]


@needs_browser
@pytest.mark.slow
def test_the_run_page_queries_the_trained_model_and_draws_the_step_size(browser, live_api):
    """Log density and forecast in the page equal the API's answers to the same request; the step-size curve."""
    base, settings = live_api
    long = bool(SCREENSHOTS)  # screenshots of a trained model; the check itself needs only a checkpoint
    cnf = {"model": {"type": "cnf", "hidden_dims": [16, 16] if long else [8]},
           "dataset": {"name": "moons", "n_samples": 2000 if long else 200},
           "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
           "training": {"iterations": 400 if long else 4, "batch_size": 128 if long else 32, "lr": 1e-2,
                        "eval_every": 50 if long else 4, "checkpoint_every": 100 if long else 4},
           "name": "query cnf"}
    node = {"model": {"type": "node", "hidden_dims": [32, 32] if long else [8]},
            "dataset": {"name": "lotka_volterra", "n_samples": 100 if long else 10},
            "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-4},
            "training": {"iterations": 600 if long else 2, "batch_size": 16 if long else 4, "lr": 1e-2,
                         "eval_every": 100 if long else 2, "checkpoint_every": 100 if long else 2},
            "name": "query node"}
    with httpx.Client(base_url=base, timeout=60) as client:
        answers = [client.post("/v1/jobs", json=spec) for spec in (cnf, node)]
        assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
        ids = [a.json()["id"] for a in answers]
        for job_id in ids:
            assert run_job(job_id, worker(settings)) == "succeeded"
        rows = client.get(f"/v1/jobs/{ids[0]}/metrics").json()["history"]
        with_step = [r["step_size"] for r in rows if "step_size" in r]
        assert len(with_step) == cnf["training"]["iterations"] and all(0 < h <= 1.0 for h in with_step)  # T = 1

        browser.get(f"{base}/#/run/{ids[0]}")
        wait_for(lambda: points(browser, "chart-step") == len(with_step), what="the step-size curve")
        shot(browser, "run_cnf")
        points_text = browser.find_element(By.ID, "query-points").get_attribute("value")
        reference = client.post(f"/v1/jobs/{ids[0]}/log-density", json={"points": json.loads(points_text)}).json()
        browser.find_element(By.ID, "query-run").click()
        assert query_table(browser) == pytest.approx(reference["log_density"], rel=1e-12)
        browser.execute_script("document.getElementById('query-heading').scrollIntoView()")
        shot(browser, "query_density")
        browser.find_element(By.ID, "query-samples").click()
        wait_for(lambda: points(browser, "query-chart") == 1000, what="1000 samples drawn")
        shot(browser, "query_samples")
        set_editor(browser, browser.find_element(By.ID, "query-points"), "[[0.5, 0.5, 0.5]]")  # the model is 2-D
        bad = client.post(f"/v1/jobs/{ids[0]}/log-density", json={"points": [[0.5, 0.5, 0.5]]})
        browser.find_element(By.ID, "query-run").click()
        assert shown_problems(browser, "#query-result") == {(e["field"], e["reason"]) for e in bad.json()["errors"]}

        browser.get(f"{base}/#/run/{ids[1]}")
        body = json.loads(wait_for(lambda: browser.find_element(By.ID, "query-body"), what="the forecast form")
                          .get_attribute("value"))  # the built-in Lotka-Volterra example
        reference = client.post(f"/v1/jobs/{ids[1]}/forecast", json=body).json()
        browser.find_element(By.ID, "query-run").click()
        expected = [v for row in reference["forecasts"][0]["mean"] for v in row]
        assert query_table(browser) == pytest.approx(expected, rel=1e-12)
        assert points(browser, "query-chart") == len(expected) + len(body["series"][0]["y"]) * 2  # means and observations
        browser.execute_script("document.getElementById('query-heading').scrollIntoView()")
        shot(browser, "query_forecast")


@needs_browser
@pytest.mark.slow
@pytest.mark.parametrize("live_api", [{"api_keys": f"alice:{ALICE}"}], indirect=True)
def test_with_api_keys_the_page_asks_for_the_key_and_keeps_it_out_of_urls(browser, live_api):
    base, settings = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/").status_code == 200 and client.get("/dashboard/app.js").status_code == 200
        assert client.get("/v1/jobs").status_code == 401  # the data stays behind the key
        job_id = client.post("/v1/jobs", json=tiny_spec("keyed"), headers={"Authorization": f"Bearer {ALICE}"}).json()["id"]
    browser.get(f"{base}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    dialog = wait_for(lambda: browser.find_element(By.ID, "key-dialog").get_attribute("open") is not None
                      and browser.find_element(By.ID, "key-dialog"), what="the key prompt")
    dialog.find_element(By.ID, "key-input").send_keys(ALICE)
    dialog.find_element(By.ID, "key-save").click()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]'), what="the keyed job")
    assert browser.execute_script("return sessionStorage.getItem('odeforge.apiKey')") == ALICE
    assert browser.execute_script("return localStorage.length") == 0
    browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"] a.run-link').click()
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "queued", what="the run page")
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not any(ALICE in u for u in urls + [browser.current_url])
    assert all(u.startswith(base) for u in urls)  # nothing fetched from outside the app
    browser.execute_script("sessionStorage.clear()")


def test_the_page_and_its_assets_are_served_from_the_package_and_fetch_nothing_from_outside(tmp_path):
    """Offline: every file the page loads comes from this server (no CDN); runs without a browser."""
    from importlib.resources import files

    from fastapi.testclient import TestClient

    from jobs.settings import Settings
    from service.app import create_app

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", broker_url="memory://",
                        artifact_dir=tmp_path / "artifacts", api_keys=f"alice:{ALICE}")
    with TestClient(create_app(settings)) as client:
        page = client.get("/")  # public: the page holds no data and asks for the key
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href)="([^"#][^"]*)"', page.text)
        assets = sorted(r for r in refs if r.startswith("dashboard/"))
        assert assets == ["dashboard/app.js", "dashboard/schema.js", "dashboard/style.css"]
        assert not [r for r in refs if "//" in r]  # no absolute or protocol-relative URL
        for asset in assets:
            answer = client.get(f"/{asset}")
            assert answer.status_code == 200
            assert answer.content == (files("service") / asset).read_bytes()  # shipped in the package
            assert not re.search(r"https?://", answer.text)
        assert client.get("/v1/jobs").status_code == 401  # the data is still behind the key
