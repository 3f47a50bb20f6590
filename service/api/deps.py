"""Request dependencies: the settings, a session whose transaction the request owns, and load-or-404."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from service.db import session_factory
from service.jobs.service import load_job
from service.models import Job
from service.settings import Settings, get_settings


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_factory(settings)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def get_job_or_404(job_id: str, session: SessionDep) -> Job:
    return load_job(session, job_id)


JobDep = Annotated[Job, Depends(get_job_or_404)]
