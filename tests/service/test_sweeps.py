"""POST /v1/sweeps refuses a bad request with every problem at once; a tenant sees only its own sweeps; and the
driver's state is the database's: a fresh optuna storage (a restarted worker) continues the same study, takes up a
trial asked but never stored, and a cancelled sweep leaves no optuna trial running. No worker runs here: the
module has a database and a queue of its own, so the session's workers, whose maintenance rounds drive every
sweep they can see, never advance these sweeps or train their trials; the trials' jobs are queued and cancelled,
never trained (tests/e2e/test_sweep_jobs.py trains a whole sweep)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.app import create_app

GIB = 1024**3


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    rows = [{"instruction": f"Repeat the word number {i}.", "output": f"word {i} word {i}"} for i in range(16)]
    (data_root / "sweep-service.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return "sweep-service.jsonl"


@pytest.fixture(scope="module")
def own_settings(database, settings):
    """The session's settings on a fresh database (built by the migrations) and a queue nobody consumes."""
    import uuid

    import psycopg
    from harness import PG_ADMIN_URL

    from service.db import get_engine
    from service.migrate import upgrade_database

    name = f"ftjobs_sweeps_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    own = settings.model_copy(update={"database_url": url, "queue_name": f"sweeps-{name}"})
    upgrade_database(own)
    yield own
    get_engine(own).dispose()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def make_key(own_settings):
    """A real key in this module's database, made as `ftjobs keys create` makes one."""
    from harness import TestKey

    from service.db import transaction
    from service.tenancy.keys import Caller, create_key

    def make(tenant: str, *, admin: bool = False) -> TestKey:
        with transaction(own_settings) as session:
            key, secret = create_key(session, tenant, admin=admin)
            return TestKey(secret, Caller(key_id=key.id, tenant_id=key.tenant_id, admin=key.admin))

    return make


@pytest.fixture()
def client_for(own_settings):
    clients = []

    def open_client(key) -> TestClient:
        client = TestClient(create_app(own_settings), headers=key.headers)
        clients.append(client.__enter__())
        return client

    yield open_client
    for client in clients:
        client.__exit__(None, None, None)


def sweep_request(tiny_model, dataset: str, **overrides) -> dict:
    spec = {
        "base_model": str(tiny_model),
        "method": "lora",
        "dataset": {"path": dataset},
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64, "validation_fraction": 0.25},
        "resources": {"gpu_memory_gib": 2},  # micro_batch_size 1024 does not fit (POST /v1/plans)
    }
    search_space = {
        "training.learning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-2},
        "training.micro_batch_size": {"type": "categorical", "choices": [2, 1024]},
    }
    return {"spec": spec, "search_space": search_space, "n_trials": 3, "parallelism": 1, **overrides}


def test_a_bad_request_is_refused_with_every_problem(client_for, make_key, tiny_model, dataset):
    api = client_for(make_key("sweeps-bad"))
    request = sweep_request(tiny_model, dataset, n_trials=2, parallelism=3)
    request["spec"]["training"].pop("validation_fraction")
    request["search_space"] = {
        "lora.q": {"type": "categorical", "choices": [1]},
        "lora": {"type": "int", "low": 1, "high": 4},
        "training.learning_rate": {"type": "log_uniform", "low": 1e-3, "high": 1e-5},
    }
    response = api.post("/v1/sweeps", json=request)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "invalid_spec" and response.headers["content-type"] == "application/problem+json"
    for expected in (
        "lora.q is not a field of the job spec",
        "lora is a section of the spec",
        "low 0.001 must be below high 1e-05",
        "parallelism 3 exceeds n_trials 2",
        "metric eval_loss needs a validation set",
    ):
        assert expected in problem["detail"], problem["detail"]
    for bad in (
        {"search_space": {"training.learning_rate": {"type": "normal", "low": 0, "high": 1}}},
        {"n_trials": 0},
        {"n_trials": 10_000},
        {"enqueue_trials": [{"training.micro_batch_size": 3}]},
    ):
        response = api.post("/v1/sweeps", json={**sweep_request(tiny_model, dataset), **bad})
        assert response.status_code == 422, (bad, response.text)
    response = api.post("/v1/sweeps", json=sweep_request(tiny_model, dataset) | {"spec": {"base_model": "nope"}})
    assert response.status_code == 422


def test_a_tenant_sees_only_its_own_sweeps(client_for, make_key, tiny_model, dataset):
    owner, other = client_for(make_key("sweeps-a")), client_for(make_key("sweeps-b"))
    admin = client_for(make_key("sweeps-admin", admin=True))
    response = owner.post("/v1/sweeps", json=sweep_request(tiny_model, dataset))
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert sweep["id"].startswith("swp_") and sweep["status"] == "running" and sweep["trials"] == []
    assert isinstance(sweep["request"]["sampler"]["seed"], int)  # drawn once, kept for every later round
    assert other.get(f"/v1/sweeps/{sweep['id']}").status_code == 404
    assert other.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 404
    assert other.get("/v1/sweeps/swp_000000000000000000000000").json()["code"] == "sweep_not_found"
    assert admin.get(f"/v1/sweeps/{sweep['id']}").status_code == 200
    assert owner.post(f"/v1/sweeps/{sweep['id']}/cancel").json()["status"] == "cancelling"
    assert owner.post(f"/v1/sweeps/{sweep['id']}/cancel").json()["status"] == "cancelling"  # until the driver


def test_a_fresh_driver_continues_the_study(client_for, make_key, own_settings, tiny_model, dataset):
    from optuna.trial import TrialState

    from service.sweeps import study as studies
    from service.sweeps.driver import advance_sweeps
    from service.sweeps.request import SweepRequest

    api = client_for(make_key("sweeps-restart"))
    request = sweep_request(
        tiny_model,
        dataset,
        enqueue_trials=[
            {"training.micro_batch_size": 1024},
            {"training.micro_batch_size": 2},
            {"training.micro_batch_size": 2, "training.learning_rate": 1e-3},  # the orphan's: it fits
        ],
        pruner={"type": "none"},
    )
    sweep_id = api.post("/v1/sweeps", json=request).json()["id"]
    advance_sweeps(own_settings)
    unfit, first = api.get(f"/v1/sweeps/{sweep_id}").json()["trials"]
    # Planned before it was queued: never a job, pruned with the planner's peak and why.
    assert unfit["state"] == "pruned" and unfit["job_id"] is None
    assert unfit["pruned_reason"].startswith("does not fit: predicted peak") and unfit["predicted_peak_bytes"] > GIB
    assert first["state"] == "queued" and first["job_id"] and first["params"]["training.micro_batch_size"] == 2
    assert api.get(f"/v1/jobs/{first['job_id']}").json()["spec"]["metadata"]["ftjobs_sweep"] == sweep_id

    studies.forget_storages()  # a restarted worker: nothing of optuna's in memory
    advance_sweeps(own_settings)  # its one slot is taken: nothing new is asked
    study = _study(own_settings, sweep_id, SweepRequest)
    states = [(t.number, t.state) for t in study.study.trials]
    assert states == [(0, TrialState.PRUNED), (1, TrialState.RUNNING), (2, TrialState.WAITING)]
    orphan, _ = studies.ask(study)  # as if a round died between optuna's ask and its commit

    assert api.post(f"/v1/jobs/{first['job_id']}/cancel").json()["status"] == "cancelled"
    studies.forget_storages()
    advance_sweeps(own_settings)
    trials = api.get(f"/v1/sweeps/{sweep_id}").json()["trials"]
    assert [(t["number"], t["state"]) for t in trials] == [(0, "pruned"), (1, "pruned"), (orphan, "queued")]
    assert trials[1]["pruned_reason"] == "the job was cancelled"
    study = _study(own_settings, sweep_id, SweepRequest)
    assert len(study.study.trials) == 3  # the orphan was taken up, not a fourth asked

    assert api.post(f"/v1/sweeps/{sweep_id}/cancel").json()["status"] == "cancelling"
    advance_sweeps(own_settings)
    sweep = api.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["status"] == "cancelled" and sweep["finished_at"]
    assert api.get(f"/v1/jobs/{trials[2]['job_id']}").json()["status"] == "cancelled"
    assert api.post(f"/v1/sweeps/{sweep_id}/cancel").json()["code"] == "sweep_finished"
    assert {t.state for t in _study(own_settings, sweep_id, SweepRequest).study.trials} == {TrialState.PRUNED}


def _study(settings, sweep_id: str, request_model):
    from service.db import transaction
    from service.sweeps import repository
    from service.sweeps import study as studies

    with transaction(settings) as session:
        sweep = repository.get_sweep(session, sweep_id, None)
        return studies.open_study(settings, sweep, request_model.model_validate(sweep.request))


def test_sweeps_are_listed_newest_first_a_page_at_a_time_within_the_tenant(client_for, make_key, tiny_model, dataset):
    owner, other = client_for(make_key("sweeps-list-a")), client_for(make_key("sweeps-list-b"))
    admin = client_for(make_key("sweeps-list-admin", admin=True))
    created = [owner.post("/v1/sweeps", json=sweep_request(tiny_model, dataset)).json()["id"] for _ in range(3)]
    first = owner.get("/v1/sweeps", params={"limit": 2}).json()
    assert [sweep["id"] for sweep in first["data"]] == created[::-1][:2] and first["next_cursor"] == created[1]
    rest = owner.get("/v1/sweeps", params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [sweep["id"] for sweep in rest["data"]] == [created[0]] and rest["next_cursor"] is None
    summary = rest["data"][0]
    assert summary["status"] == "running" and summary["n_trials"] == 3 and summary["trials_by_state"] == {}
    assert other.get("/v1/sweeps").json() == {"data": [], "next_cursor": None}
    assert set(created) <= {sweep["id"] for sweep in admin.get("/v1/sweeps", params={"limit": 200}).json()["data"]}
    # Another tenant's sweep is no cursor: as missing as none.
    response = other.get("/v1/sweeps", params={"after": created[0]})
    assert response.status_code == 400 and response.json()["code"] == "invalid_cursor"
