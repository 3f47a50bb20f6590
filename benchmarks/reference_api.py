"""The reference for benchmarks/api_load.py: the smallest FastAPI + SQLAlchemy app that serves the same reads
from the same tables through the same indexes, written the way the FastAPI and SQLAlchemy docs show.

No authentication, rate limit, tenancy, metrics or response schema: what is left is the floor that any app on
this stack pays per request. Sync endpoints in FastAPI's threadpool (40 threads), a pool sized to match.

    BENCH_DATABASE_URL=postgresql+psycopg://... uvicorn benchmarks.reference_api:app
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import FastAPI, Response
from sqlalchemy import create_engine, text

from domain.spec import JobSpec
from planner import ModelShape, plan

engine = create_engine(os.environ["BENCH_DATABASE_URL"], pool_size=40, max_overflow=0)
app = FastAPI()
# The benchmark's one model, read once: the reference has no model roots to search.
MODEL = ModelShape.from_config(
    json.loads((Path(os.environ["BENCH_MODEL_DIR"]) / "config.json").read_text()), name=os.environ["BENCH_MODEL_DIR"]
)
GIB = 1024**3
JOB_COLUMNS = (
    "id, status, tenant_id, created_by_key_id, cancelled_by_key_id, spec, progress, "
    "predicted_peak_bytes, measured_peak_bytes, plan, error_code, error_message, artifacts, "
    "created_at, started_at, finished_at"
)


@app.get("/v1/jobs/{job_id}")
def get_job(job_id: str):
    with engine.connect() as connection:
        row = connection.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id"), {"id": job_id}).first()
    return dict(row._mapping) if row else Response(status_code=404)


@app.get("/v1/jobs")
def list_jobs(tenant_id: str, before_seq: int | None = None, limit: int = 50):
    bound = "AND seq < :before" if before_seq is not None else ""
    with engine.connect() as connection:
        rows = connection.execute(
            text(f"SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = :tenant {bound} ORDER BY seq DESC LIMIT :limit"),
            {"tenant": tenant_id, "before": before_seq, "limit": limit},
        ).all()
    return {"data": [dict(row._mapping) for row in rows]}


@app.get("/v1/jobs/{job_id}/events")
def list_events(job_id: str, after: int = 0, limit: int = 100):
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT seq, kind, data, created_at FROM job_events "
                "WHERE (job_id, seq) > (:id, :after) "
                "AND (job_id, seq) <= (:id, 9223372036854775807) "
                "ORDER BY job_id, seq LIMIT :limit"
            ),
            {"id": job_id, "after": after, "limit": limit},
        ).all()
    return {"data": [dict(row._mapping) for row in rows]}


@app.post("/v1/plans")
def create_plan(spec: JobSpec):
    return plan(spec, MODEL, int(spec.resources.gpu_memory_gib * GIB))


@app.post("/v1/jobs", status_code=201)
def submit_job(spec: JobSpec):
    """Validate, plan, insert the row: what a job service cannot skip, without tenancy, quota or a queue."""
    job_plan = plan(spec, MODEL, int(spec.resources.gpu_memory_gib * GIB))
    with engine.begin() as connection:
        row = connection.execute(
            text(
                "INSERT INTO jobs (id, status, tenant_id, spec, plan, base_model_path, dataset_url,"
                " predicted_peak_bytes, attempt, created_at, updated_at)"
                " VALUES ('ref_' || md5(random()::text), 'queued', :tenant, "
                "CAST(:spec AS jsonb), CAST(:plan AS jsonb), '', '', :peak, 0, now(), now()) RETURNING id"
            ),
            {
                "tenant": os.environ["BENCH_TENANT_ID"],
                "spec": spec.model_dump_json(),
                "plan": job_plan.model_dump_json(),
                "peak": job_plan.peak_vram_bytes,
            },
        ).one()
    return {"id": row.id, "plan": job_plan}
