"""Engines and sessions. The request (service/api/deps.py) or the task wrapper owns each transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from service.errors import DatabaseBusy, DatabaseUnavailable
from service.settings import Settings, get_settings

QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE for a statement cut off by statement_timeout


def _tune_sqlite(dbapi_connection, _record) -> None:
    # The API, the worker and the broker share one SQLite file in the embedded set-up:
    # WAL lets readers run beside the writer, and the busy timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(
    url: str,
    *,
    idle_in_transaction_seconds: float | None = None,
    statement_timeout_seconds: float | None = None,
    **pool: Any,
) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    options = [
        f"-c {name}={int(seconds * 1000)}"
        for name, seconds in (
            ("idle_in_transaction_session_timeout", idle_in_transaction_seconds),
            ("statement_timeout", statement_timeout_seconds),
        )
        if seconds
    ]
    # Small pools: a worker holds one connection at a time per thread, and PostgreSQL's 100 are shared.
    return create_engine(
        url,
        connect_args={"options": " ".join(options)} if options else {},
        **({"pool_pre_ping": True, "pool_size": 5, "max_overflow": 5} | pool),
    )


def make_api_engine(settings: Settings) -> Engine:
    """A pool as large as the API's threads, never pinged (recycled instead), each query bounded in time.

    No idle-in-transaction timeout here, unlike the workers' engine: a submission validates its dataset (once per
    version, seconds for a large one) inside its write unit, and would be cut off every time it is retried."""
    return make_engine(
        settings.sqlalchemy_url,
        statement_timeout_seconds=settings.api_statement_timeout_seconds,
        pool_pre_ping=False,
        pool_size=settings.api_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_seconds,
        pool_recycle=settings.db_pool_recycle_seconds,
    )


@lru_cache
def _engine_for(url: str, idle_in_transaction_seconds: float) -> Engine:
    return make_engine(url, idle_in_transaction_seconds=idle_in_transaction_seconds)


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    if settings.sqlalchemy_url.startswith("sqlite"):
        settings.resolved_home.mkdir(parents=True, exist_ok=True)
    return _engine_for(settings.sqlalchemy_url, settings.idle_in_transaction_timeout)


@lru_cache
def _sessions_for(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return _sessions_for(get_engine(settings))


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
    on a fresh connection can succeed. A statement cut off by its timeout is not one: it would only time out
    again."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, OperationalError) and getattr(error.orig, "sqlstate", None) != QUERY_CANCELED


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


class Database:
    """The API process's database: its engine, and a unit of work per request run in one thread.

    A request talks to the database in exactly one function run in one of `api_threads` threads, so it holds a
    connection only while that function runs, and the pool (as large as the threads) always has one for it.
    Waiting is bounded: a request that finds no free thread, or then no free connection, within
    `db_pool_timeout_seconds`, and a statement past the statement timeout, answer 503 database_busy.
    A read runs in autocommit: no BEGIN, COMMIT or ROLLBACK, one round trip per statement. A write is one
    transaction, committed before the response starts. A lost connection is a 503 too, never a 500.
    """

    READ_RETRIES = 2

    def __init__(self, settings: Settings) -> None:
        self.engine = make_api_engine(settings)
        self.wait_seconds = settings.db_pool_timeout_seconds
        self._writes = sessionmaker(self.engine, expire_on_commit=False)
        read_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._reads = sessionmaker(read_engine, expire_on_commit=False)
        self._read_connections = read_engine.connect
        # A slot per thread: a request holding one always finds its thread free. Waiting for a slot is where the
        # timeout applies, as a thread cannot be abandoned once it has started the work. The executor, not
        # anyio's to_thread, because a request then suspends once (for the result) instead of at each of
        # to_thread's checkpoints, and every suspension resumes the whole chain of middleware coroutines.
        self._slots = asyncio.Semaphore(settings.api_threads)
        self._threads = ThreadPoolExecutor(settings.api_threads, thread_name_prefix="ftjobs-db")

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        """`work(session, *args)` in autocommit."""
        return await self._in_thread(self._read, self._reads, work, args)

    async def read_rows(self, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in autocommit: for the hottest reads (status polls), which need rows, not
        entities, and so skip a Session's per-use bookkeeping."""
        return await self._in_thread(self._read, self._read_connections, work, args)

    async def write(self, work: Callable[..., T], *args: Any) -> T:
        """`work(session, *args)` in one transaction, committed when it returns."""
        return await self._in_thread(self._write, work, args)

    async def _in_thread(self, unit: Callable[..., T], *unit_args: Any) -> T:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.wait_seconds):  # no task per waiter, as wait_for would make
                    await self._slots.acquire()
            except TimeoutError:
                raise DatabaseBusy(f"every database thread stayed busy for {self.wait_seconds:g} s") from None
        else:
            await self._slots.acquire()  # free: returns without suspending
        loop = asyncio.get_running_loop()
        running = self._threads.submit(unit, *unit_args)
        # Released when the thread is done, not when the request stops waiting (a client that hung up): the slot
        # and its thread are one.
        running.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))
        return await asyncio.wrap_future(running)

    def _read(self, open_unit: Callable[[], Any], work: Callable[..., T], args: tuple) -> T:
        for attempt in range(self.READ_RETRIES + 1):
            try:
                with open_unit() as unit:
                    return work(unit, *args)
            except (DBAPIError, PoolTimeout) as error:
                if attempt < self.READ_RETRIES and is_disconnect(error):
                    log.warning("database connection lost during a read (%s); running it again", error.orig)
                    continue
                raise self._problem(error) from error
        raise AssertionError("unreachable")

    def _write(self, work: Callable[..., T], args: tuple) -> T:
        try:
            with self._writes() as session, session.begin():
                return work(session, *args)
        except (DBAPIError, PoolTimeout) as error:
            raise self._problem(error) from error

    def _problem(self, error: Exception) -> Exception:
        """What the client gets: a 503 to retry after, or the error itself when a retry cannot help."""
        if isinstance(error, PoolTimeout):
            return DatabaseBusy(f"no database connection was free within {self.wait_seconds:g} s")
        if getattr(getattr(error, "orig", None), "sqlstate", None) == QUERY_CANCELED:
            return DatabaseBusy("the query ran past the API's statement timeout")
        if is_disconnect(error):
            # A write's transaction did not commit, so retrying the request is safe.
            return DatabaseUnavailable("the database connection was lost; retry the request")
        return error

    def dispose(self) -> None:
        self._threads.shutdown(wait=True)
        self.engine.dispose()
