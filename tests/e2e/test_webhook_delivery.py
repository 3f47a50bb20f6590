"""The whole path with a webhook: API → worker → real CPU training, and every state change and checkpoint the
job went through POSTed to a real receiver by the worker's sender, signed, in the order of the job's events."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook

from service.db import transaction
from service.tenancy.keys import create_key
from service.tenancy.repository import get_tenant_by_name


@pytest.fixture()
def receiver():
    received: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((dict(self.headers.items()), self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", received
    server.shutdown()
    server.server_close()


def test_a_trained_job_reports_its_states_and_checkpoints(
    api, worker, tiny_model, data_root, wait_for_status, receiver
):
    url, received = receiver
    name = f"e2e-hooks-{uuid.uuid4().hex[:6]}"
    with transaction() as session:
        _, secret = create_key(session, name, webhook_url=url)
        signing_secret = get_tenant_by_name(session, name).webhook_secret
    headers = {"Authorization": f"Bearer {secret}"}
    rows = [{"instruction": f"Repeat {i}.", "output": f"{i} {i}"} for i in range(8)]
    (data_root / "e2e-hooks.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {
        "base_model": str(tiny_model),
        "dataset": {"path": "e2e-hooks.jsonl"},
        "method": "qlora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 4, "micro_batch_size": 2, "max_seq_length": 64, "checkpoint_every_steps": 2},
    }
    job_id = api.post("/v1/jobs", json=spec, headers=headers).json()["id"]
    assert wait_for_status(job_id, {"succeeded", "failed"})["status"] == "succeeded"

    reported = [
        e
        for e in api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
        if e["kind"] in ("state", "checkpoint")
    ]
    deadline = time.monotonic() + 60
    while len(received) < len(reported) and time.monotonic() < deadline:
        time.sleep(0.2)
    verifier = Webhook(signing_secret)
    payloads = sorted((verifier.verify(body, sent) for sent, body in received), key=lambda p: p["data"]["seq"])
    assert [p["data"]["seq"] for p in payloads] == [e["seq"] for e in reported]
    assert [p["data"].get("status") for p in payloads if p["type"] == "job.status_changed"] == [
        "queued",
        "running",
        "succeeded",
    ]
    assert (
        [p["data"]["step"] for p in payloads if p["type"] == "job.checkpoint_saved"]
        == [e["data"]["step"] for e in reported if e["kind"] == "checkpoint"]
        != []
    )
    log = api.get(f"/v1/jobs/{job_id}/webhook_deliveries", headers=headers).json()["data"]
    assert {d["status"] for d in log} == {"delivered"} and all(d["attempts"][-1]["status_code"] == 204 for d in log)
