"""Request dependencies: the settings, a session whose transaction the request owns, the caller, load-or-404."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.db import session_factory
from service.jobs.service import load_job
from service.models import Job
from service.settings import Settings, get_settings
from service.tenancy.keys import Caller, authenticate
from service.tenancy.ratelimit import check_rate


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_factory(settings)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


SettingsDep = Annotated[Settings, Depends(get_settings)]
# Function scope: the transaction ends (commits) before the response starts, so a client never sees a success
# whose commit failed, and a lost connection at COMMIT is still a clean retry or 503 (service/app.py).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
# auto_error=False: a missing key is our own 401 problem+json, not FastAPI's bare 403.
_bearer = HTTPBearer(auto_error=False, description="An API key from `ftjobs keys create`")


def get_caller(session: SessionDep, settings: SettingsDep,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    header = f"Bearer {credentials.credentials}" if credentials else None
    caller = authenticate(session, header)
    check_rate(settings, caller.key_id)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_job_or_404(job_id: str, session: SessionDep, caller: CallerDep) -> Job:
    return load_job(session, job_id, caller.tenant_scope)


JobDep = Annotated[Job, Depends(get_job_or_404)]
