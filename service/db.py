"""Engine and session factory. The request dependency or the task wrapper owns each transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings, get_settings


def _tune_sqlite(dbapi_connection, _record) -> None:
    # The API, the worker and the broker share one SQLite file in the embedded set-up:
    # WAL lets readers run beside the writer, and the busy timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    # Small pools: a worker holds one connection at a time per thread, and PostgreSQL's 100 are shared.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@lru_cache
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    if settings.sqlalchemy_url.startswith("sqlite"):
        settings.resolved_home.mkdir(parents=True, exist_ok=True)
    return _engine_for(settings.sqlalchemy_url)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


@contextmanager
def transaction(settings: Settings | None = None) -> Iterator[Session]:
    """A unit of work for code outside a request: commits on success, rolls back on error."""
    with session_factory(settings)() as session, session.begin():
        yield session


T = TypeVar("T")
log = logging.getLogger(__name__)
RETRY_DELAYS_SECONDS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


def is_disconnect(error: Exception) -> bool:
    """A lost connection (a restarted server, pg_terminate_backend, a network blip): running the unit again
    on a fresh connection can succeed."""
    return isinstance(error, OperationalError) or (isinstance(error, DBAPIError) and error.connection_invalidated)


def in_transaction(work: Callable[[Session], T], settings: Settings | None = None) -> T:
    """Run `work` as one transaction, again from the start on a fresh connection if the connection was lost.

    `work` must be safe to run twice: it is only ever retried when its transaction did not commit.
    """
    for delay in (*RETRY_DELAYS_SECONDS, None):
        try:
            with transaction(settings) as session:
                return work(session)
        except DBAPIError as error:
            if delay is None or not is_disconnect(error):
                raise
            log.warning("database connection lost (%s); retrying in %.1f s", type(error.orig).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
