"""Webhooks against the real PostgreSQL and a real HTTP receiver: state changes are POSTed signed (checked with
the Standard Webhooks reference library), a 500 is retried after its backoff, the delivery log shows every
attempt, and a delivery pending when its sender dies is sent by the next worker to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient
from harness import TestKey as Key  # renamed: pytest would try to collect a Test* class
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.app import create_app
from service.db import transaction
from service.tenancy.keys import Caller, create_key
from service.tenancy.repository import get_tenant_by_name
from service.webhooks.delivery import deliver_due

ROW = {"instruction": "Say hi.", "output": "Hi!"}


class Receiver:
    """A tiny threaded HTTP server: answers `failures` 500s to each webhook-id, then 200; keeps what it got."""

    def __init__(self, failures: int = 1) -> None:
        self.failures, self.received, self.lock = failures, [], threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    message_id = self.headers["webhook-id"]
                    seen = sum(1 for headers, _ in receiver.received if headers["webhook-id"] == message_id)
                    receiver.received.append((dict(self.headers.items()), body))
                    status = 500 if seen < receiver.failures else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    made = []

    def make(failures: int = 1) -> Receiver:
        made.append(Receiver(failures))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    (data_root / "webhooks.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(8)) + "\n")
    return "webhooks.jsonl"


def tenant_with_webhook(url: str) -> tuple[Key, str]:
    """A key of a new tenant whose webhook is `url`, made as `ftjobs keys create --webhook-url` does; and its
    signing secret."""
    name = f"hooks-{uuid.uuid4().hex[:8]}"
    with transaction() as session:
        key, secret = create_key(session, name, max_active_jobs=10, webhook_url=url)
        signing = get_tenant_by_name(session, name).webhook_secret
        return Key(secret, Caller(key_id=key.id, tenant_id=key.tenant_id, admin=False)), signing


def spec(model_dir, dataset: str) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "qlora",
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64},
    }


@pytest.fixture()
def client(database, settings):
    with TestClient(create_app(settings)) as plain:
        yield plain


def deliveries(client, key, job_id) -> list[dict]:
    response = client.get(f"/v1/jobs/{job_id}/webhook_deliveries", headers=key.headers)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_state_changes_are_signed_retried_after_a_500_and_logged(
    client, receiver, settings, tiny_model, dataset, make_key
):
    hook = receiver(failures=1)
    key, signing_secret = tenant_with_webhook(hook.url)
    assert signing_secret.startswith("whsec_")
    job_id = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=key.headers).json()["status"] == "cancelled"
    assert [d["status"] for d in deliveries(client, key, job_id)] == ["pending", "pending"]

    # Sent by this process's own sender rounds (another sender, a worker of the same test session, may take some:
    # the log is the same whoever sends).
    fast = settings.model_copy(update={"webhook_retry_base_seconds": 0.3})
    with httpx.Client(timeout=5, follow_redirects=False) as http, ThreadPoolExecutor(4) as pool:

        def both_delivered() -> bool:
            deliver_due(fast, http, pool)
            return all(d["status"] == "delivered" for d in deliveries(client, key, job_id))

        wait_until(both_delivered, 30, "both deliveries")

    log = deliveries(client, key, job_id)
    assert [d["event_type"] for d in log] == ["job.status_changed", "job.status_changed"]
    for delivery in log:
        assert delivery["status"] == "delivered" and delivery["delivered_at"] and delivery["next_attempt_at"] is None
        assert [(a["number"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 200)]
        assert delivery["attempts"][0]["error"] == "HTTP 500" and delivery["attempts"][1]["error"] is None
        failed_at, retried_at = (datetime.fromisoformat(a["attempted_at"]) for a in delivery["attempts"])
        assert (retried_at - failed_at).total_seconds() >= 0.3  # not before its backoff

    verifier = Webhook(signing_secret)
    payloads = [verifier.verify(body, headers) for headers, body in hook.received]
    assert len(payloads) == 4
    ids = [headers["webhook-id"] for headers, _ in hook.received]
    assert sorted(set(ids)) == sorted(d["id"] for d in log)  # a retry carries its delivery's id again
    delivered = {p["data"]["status"]: p for p in payloads}
    assert set(delivered) == {"queued", "cancelled"}
    assert delivered["cancelled"]["type"] == "job.status_changed"
    assert delivered["cancelled"]["data"]["job_id"] == job_id
    assert delivered["cancelled"]["data"]["seq"] == log[1]["event_seq"]
    # Tampered with, a body fails the check: the signature covers it.
    headers, body = hook.received[-1]
    with pytest.raises(WebhookVerificationError):
        verifier.verify(body.replace(job_id.encode(), b"job_" + b"0" * 24), headers)

    # The log is the tenant's: another tenant's key finds no such job.
    other = make_key(f"other-{uuid.uuid4().hex[:6]}")
    assert client.get(f"/v1/jobs/{job_id}/webhook_deliveries", headers=other.headers).status_code == 404


def test_a_tenant_without_a_webhook_gets_no_deliveries(client, make_key, tiny_model, dataset):
    key = make_key(f"nohook-{uuid.uuid4().hex[:6]}")
    job_id = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers).json()["id"]
    assert deliveries(client, key, job_id) == []


def start_worker(name: str) -> subprocess.Popen:
    """`ftjobs worker` as deployed, sending webhooks fast; on a queue of its own, with a requeue grace it never
    reaches, so it trains nothing of the other tests."""
    env = {
        **os.environ,
        "FTJOBS_QUEUE_NAME": f"webhooks-{uuid.uuid4().hex[:8]}",
        "FTJOBS_WORKER_METRICS_PORT": "0",
        "FTJOBS_REQUEUE_GRACE_SECONDS": "1000000",
        "FTJOBS_WEBHOOK_POLL_SECONDS": "0.2",
        "FTJOBS_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
        "FTJOBS_WEBHOOK_RETRY_MAX_SECONDS": "0.5",
        "FTJOBS_WEBHOOK_TIMEOUT_SECONDS": "2",
        "FTJOBS_WEBHOOK_MAX_ATTEMPTS": "1000",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ftjobs.cli", "worker", "--name", f"{name}@webhooks"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_until(condition, timeout_seconds: float, what: str):
    deadline = time.monotonic() + timeout_seconds
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return result


def test_a_delivery_pending_when_its_sender_dies_is_sent_by_the_next_worker(client, receiver, tiny_model, dataset):
    hook = receiver(failures=10**6)  # down until the test says otherwise
    key, signing_secret = tenant_with_webhook(hook.url)
    job_id = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers).json()["id"]
    first = start_worker("first")
    try:
        wait_until(lambda: len(deliveries(client, key, job_id)[0]["attempts"]) >= 2, 120, "failed attempts")
    finally:
        os.killpg(first.pid, 9)
        first.wait(timeout=30)
    failed = len(deliveries(client, key, job_id)[0]["attempts"])
    hook.failures = 0  # the receiver is back
    second = start_worker("second")
    try:
        delivery = wait_until(
            lambda: (d := deliveries(client, key, job_id)[0])["status"] == "delivered" and d, 120, "the delivery"
        )
    finally:
        os.killpg(second.pid, 15)
        second.wait(timeout=60)
    codes = [a["status_code"] for a in delivery["attempts"]]
    assert codes[:failed] == [500] * failed and codes[-1] == 200
    headers, body = hook.received[-1]
    assert headers["webhook-id"] == delivery["id"]
    assert Webhook(signing_secret).verify(body, headers)["data"] == {
        "job_id": job_id,
        "seq": delivery["event_seq"],
        "status": "queued",
    }


def test_keys_create_sets_the_tenant_webhook_and_prints_its_secret(database):
    name = f"cli-hooks-{uuid.uuid4().hex[:6]}"

    def ftjobs(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ftjobs.cli", "keys", "create", "--tenant", name, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = ftjobs("--webhook-url", "https://hooks.example/ftjobs")
    assert created.returncode == 0, created.stderr
    printed = created.stdout.split("secret: ", 1)[1].split()[0]
    with transaction() as session:
        tenant = get_tenant_by_name(session, name)
        assert (tenant.webhook_url, tenant.webhook_secret) == ("https://hooks.example/ftjobs", printed)
    assert printed.startswith("whsec_") and Webhook(printed)  # the reference library accepts it as a secret
    # A second key keeps the secret; a URL that is not one is refused, exit 2 with a problem.
    assert printed in ftjobs("--webhook-url", "https://hooks.example/v2").stdout
    refused = ftjobs("--webhook-url", "file:///etc/passwd")
    assert refused.returncode == 2 and refused.stderr.startswith("ftjobs: invalid_webhook_url: ")
    as_json = ftjobs("--webhook-url", "https://hooks.example/v3", "--json")
    assert json.loads(as_json.stdout)["webhook_secret"] == printed


def test_the_outbox_row_commits_with_its_event_or_not_at_all(client, tiny_model, dataset):
    from service.jobs import repository

    key, _ = tenant_with_webhook("http://127.0.0.1:9/unused")
    job_id = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers).json()["id"]
    with pytest.raises(RuntimeError), transaction() as session:
        repository.add_event(session, job_id, "checkpoint", {"step": 5, "path": "jobs/x", "attempt": 1})
        raise RuntimeError("the transaction fails after the event")
    with transaction() as session:
        repository.add_event(session, job_id, "checkpoint", {"step": 10, "path": "jobs/y", "attempt": 1})
        repository.add_event(session, job_id, "progress", {"step": 10})  # progress is not a webhook's business
    log = deliveries(client, key, job_id)
    assert [d["event_type"] for d in log] == ["job.status_changed", "job.checkpoint_saved"]
    events = client.get(f"/v1/jobs/{job_id}/events", headers=key.headers).json()["data"]
    assert log[1]["event_seq"] == next(e["seq"] for e in events if e["kind"] == "checkpoint")
