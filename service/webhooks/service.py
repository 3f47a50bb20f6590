"""Reading a job's webhook deliveries, within the caller's tenant."""

from __future__ import annotations

from sqlalchemy import Connection, Row

from service.errors import JobNotFound
from service.jobs import repository as jobs
from service.jobs.service import ID_PATTERN
from service.tenancy.keys import Caller
from service.webhooks import repository


def list_deliveries(
    connection: Connection, job_id: str, after_seq: int, limit: int, caller: Caller
) -> list[tuple[Row, list[Row]]]:
    """A page of the job's deliveries, in the order of the events they report, each with its attempts."""
    if not (ID_PATTERN.fullmatch(job_id) and jobs.job_exists(connection, job_id, caller.tenant_scope)):
        raise JobNotFound(f"no job {job_id!r}")
    return repository.deliveries_of(connection, job_id, after_seq, limit)
