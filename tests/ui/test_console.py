"""The web console (/ui) in Debian's Chromium, headless, driven by Playwright, against the API under uvicorn and a
real Celery worker training on the CPU. Every request the browser makes is checked: one to anywhere but this
machine fails the test (the console must work with the network cut off).

Screenshots go to FTJOBS_SCREENSHOT_DIR (default: the test's tmp dir); the ones in docs/screenshots were taken
with FTJOBS_SCREENSHOT_DIR=docs/screenshots.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from planner.core import merge_patch

pytestmark = [pytest.mark.timeout(300)]
CHROMIUM = "/usr/bin/chromium"
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def console(uvicorn_api, worker) -> Iterator[str]:
    with uvicorn_api() as (url, _pid):
        yield url


@pytest.fixture(scope="module")
def tenant(make_key):
    """The console's user: a tenant's key, so the pages show this tenant's jobs and no one else's."""
    return make_key("console-tenant")


@pytest.fixture(scope="module")
def console_dataset(data_root) -> str:
    rows = [{"instruction": f"Say {i}.", "output": f"{i} " * (1 + i % 5)} for i in range(24)]
    (data_root / "console.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return "console.jsonl"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/services installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, console, tenant):
    """A signed-in page; `page.offsite` lists every request that tried to leave the machine."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    offsite: list[str] = []

    def guard(route) -> None:
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            offsite.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"{console}/ui")
    page.get_by_label("API key").fill(tenant.secret)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{console}/ui/jobs")
    page.offsite = offsite
    page.script_errors = script_errors
    yield page
    context.close()
    assert offsite == [], f"requests left the machine: {offsite}"
    assert script_errors == [], script_errors


def submit(console: str, key, spec: dict) -> str:
    response = httpx.post(f"{console}/v1/jobs", json=spec, headers=key.headers, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_spec(model_dir: Path, dataset: str, steps: int) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "max_steps": steps,
            "micro_batch_size": 2,
            "max_seq_length": 48,
            "logging_steps": 1,
            "validation_fraction": 0.2,
        },
        "memory": {"optimizer": "adamw"},
    }


def wait_for_status(console: str, key, job_id: str, statuses: set[str], timeout_seconds: float = 240) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while True:
        job = httpx.get(f"{console}/v1/jobs/{job_id}", headers=key.headers, timeout=30).json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def screenshot(page, name: str, tmp_path: Path) -> None:
    directory = Path(os.environ.get("FTJOBS_SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(directory / name), full_page=True)


def test_the_list_shows_a_job_and_its_status_changes_without_a_reload(
    page, console, tenant, admin_key, tiny_model, console_dataset
):
    other = submit(console, admin_key, job_spec(tiny_model, console_dataset, 2))  # another tenant's job
    job_id = submit(console, tenant, job_spec(tiny_model, console_dataset, 12))
    page.evaluate("window.__sameDocument = true")
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    row.wait_for()
    assert row.locator("td").nth(2).inner_text() == str(tiny_model)
    assert row.locator("td").nth(3).inner_text() == "lora"
    seen = set()
    deadline = time.monotonic() + 240
    while "succeeded" not in seen and time.monotonic() < deadline:
        seen.add(row.locator("td.status").inner_text())
        time.sleep(0.2)
    assert "succeeded" in seen and seen & {"queued", "running"}, seen  # it moved on the open page
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert "GiB /" in row.locator("td").nth(5).inner_text()  # planned / measured peak
    assert page.locator(f'tr[data-job-id="{other}"]').count() == 0  # the tenant sees its own jobs only
    page.select_option("#status-filter", "failed")
    page.wait_for_function(f"!document.querySelector('tr[data-job-id=\"{job_id}\"]')")


def test_the_job_page_draws_its_real_progress(page, console, tenant, tiny_model, console_dataset, tmp_path):
    job_id = submit(console, tenant, job_spec(tiny_model, console_dataset, 16))
    page.goto(f"{console}/ui/jobs/{job_id}")
    # While it trains: points arrive on the open page, over the event stream.
    page.wait_for_function(
        "document.getElementById('loss-chart').data && document.getElementById('loss-chart').data[0].x.length >= 2 "
        "&& document.getElementById('job-status').textContent === 'running'",
        timeout=180_000,
    )
    job = wait_for_status(console, tenant, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    events = httpx.get(
        f"{console}/v1/jobs/{job_id}/events", params={"limit": 1000}, headers=tenant.headers, timeout=30
    ).json()["data"]
    progress = [e["data"] for e in events if e["kind"] == "progress"]
    page.wait_for_function(f"document.getElementById('loss-chart').data[0].x.length === {len(progress)}")
    loss = page.evaluate("document.getElementById('loss-chart').data")
    assert loss[0]["x"] == [p["step"] for p in progress]
    assert loss[0]["y"] == pytest.approx([p["loss"] for p in progress])
    assert loss[1]["name"] == "eval loss" and len(loss[1]["x"]) >= 1
    memory = {trace["name"]: trace for trace in page.evaluate("document.getElementById('memory-chart').data")}
    resident = memory["host resident (CPU job)"]  # a CPU job: the host figures, labelled so
    assert resident["x"] == [p["step"] for p in progress]
    assert resident["y"][-1] == pytest.approx(progress[-1]["process_resident_bytes"] / 2**30)
    assert memory["planned peak (GPU)"]["y"][0] == pytest.approx(job["predicted_peak_bytes"] / 2**30)
    plan_traces = page.evaluate("document.getElementById('plan-chart').data")
    assert {t["name"] for t in plan_traces} == {term for terms in job["plan"]["phases"].values() for term in terms}
    assert len(plan_traces[0]["x"]) == 4  # a bar per phase
    # the last event (succeeded) makes the page fetch the job again: wait for that, not for the chart
    page.wait_for_function("document.getElementById('job-status').textContent === 'succeeded'")
    page.wait_for_function(f"document.querySelectorAll('#artifacts li').length === {len(job['artifacts'])}")
    assert page.locator("#attempts tbody tr").count() == len(job["attempts"]) == 1
    assert page.locator("#events li").count() == len(events)
    assert page.locator("#artifacts li").count() == len(job["artifacts"])
    with page.expect_download() as download:
        page.locator("#artifacts button", has_text="adapter_config.json").click()
    assert json.loads(Path(download.value.path()).read_text())["r"] == 4
    screenshot(page, "console-job.png", tmp_path)


def test_a_job_is_cancelled_from_its_page(page, console, tenant, tiny_model, console_dataset):
    job_id = submit(console, tenant, job_spec(tiny_model, console_dataset, 5000))
    page.goto(f"{console}/ui/jobs/{job_id}")
    page.wait_for_function("document.getElementById('job-progress').textContent.startsWith('step')", timeout=180_000)
    dialogs = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_function("document.getElementById('job-status').textContent === 'cancelled'", timeout=120_000)
    assert dialogs == [f"Cancel job {job_id}? Its training stops and cannot be resumed."]
    job = wait_for_status(console, tenant, job_id, {"cancelled"})
    assert job["status"] == "cancelled" and job["cancelled_by_key_id"] == tenant.caller.key_id
    assert page.locator("#cancel").is_hidden()


def test_the_playground_replans_as_fields_change_and_applies_a_suggestion(page, console, tenant, tmp_path):
    page.goto(f"{console}/ui/plan")
    peak = page.locator("#peak")
    page.wait_for_function("document.getElementById('peak').textContent.startsWith('peak')")
    page.get_by_label("Method").select_option("full")
    page.get_by_label("Optimizer").select_option("adamw")
    page.wait_for_function("document.getElementById('fits').textContent === 'does not fit'")
    at_one = gib_of(peak.inner_text())
    page.get_by_label("Micro-batch").fill("8")
    page.wait_for_function(f"!document.getElementById('peak').textContent.includes('{peak.inner_text()}')")
    at_eight = gib_of(peak.inner_text())
    assert at_eight > at_one
    suggestions = page.locator("#suggestions li")
    suggestions.first.wait_for()
    assert suggestions.count() >= 1
    spec = json.loads(page.locator("#spec-json").text_content())
    planned = httpx.post(f"{console}/v1/plans", json=spec, headers=tenant.headers, timeout=30).json()
    first = planned["suggestions"][0]  # what the page lists first, as the API answers it
    assert suggestions.first.inner_text().startswith(first["description"])
    screenshot(page, "console-planner.png", tmp_path)
    # Every field has a label (below), and a suggestion is applied from the keyboard: focus, Enter.
    suggestions.first.get_by_role("button", name="Apply").focus()
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"document.getElementById('peak').textContent === 'peak {first['peak_vram_bytes'] / 2**30:.2f} GiB'"
    )
    applied = merge_patch(spec, first["patch"])
    assert json.loads(page.locator("#spec-json").text_content()) == applied
    form = form_values(page)
    assert form["micro_batch_size"] == str(applied["training"]["micro_batch_size"])
    assert form["method"] == applied["method"] and form["optimizer"] == applied["memory"].get("optimizer", "")
    assert page.evaluate("[...document.querySelectorAll('input, select')].every(e => e.labels.length > 0)")


def gib_of(text: str) -> float:
    return float(re.search(r"([\d.]+) GiB", text)[1])


def form_values(page) -> dict:
    return page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#plan-form input, #plan-form select')]"
        ".map(e => [e.name, e.type === 'checkbox' ? e.checked : e.value]))"
    )
