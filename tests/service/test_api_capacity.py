"""More concurrent requests than the API has database connections: every one is answered, none later than the
configured waits allow, while the database holds them up; and the API recovers the moment it stops."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg

THREADS, POOL = 8, 2
SLOT_WAIT_SECONDS, STATEMENT_TIMEOUT_SECONDS = 1.0, 2.0
REQUESTS = 24  # three times the threads, twelve times the connections
# A request waits for a thread, then for a connection, then for its statement: each wait is bounded.
BOUND_SECONDS = 2 * SLOT_WAIT_SECONDS + STATEMENT_TIMEOUT_SECONDS
SLACK_SECONDS = 1.5  # process scheduling on a loaded two-core machine
MISSING_JOB = "job_000000000000000000000000"


def timed_get(url: str, headers: dict) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = httpx.get(url, headers=headers, timeout=30)
    return time.monotonic() - started, response


def test_requests_past_the_pool_get_503_within_the_waits(uvicorn_api, admin_key, settings):
    url_settings = {
        "FTJOBS_API_THREADS": str(THREADS),
        "FTJOBS_API_DB_POOL_SIZE": str(POOL),
        "FTJOBS_DB_POOL_TIMEOUT_SECONDS": str(SLOT_WAIT_SECONDS),
        "FTJOBS_API_STATEMENT_TIMEOUT_SECONDS": str(STATEMENT_TIMEOUT_SECONDS),
    }
    with uvicorn_api(**url_settings) as (url, _pid):
        job_url = f"{url}/v1/jobs/{MISSING_JOB}"
        assert httpx.get(job_url, headers=admin_key.headers).status_code == 404  # warm: connections open
        # A stalled database: every query on jobs waits for this lock (authentication reads api_keys only).
        with psycopg.connect(settings.database_url) as locker:
            locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(REQUESTS) as pool:
                results = list(pool.map(lambda _: timed_get(job_url, admin_key.headers), range(REQUESTS)))
            locker.rollback()
        recovered_seconds, recovered = timed_get(job_url, admin_key.headers)

    slowest = max(seconds for seconds, _ in results)
    assert slowest < BOUND_SECONDS + SLACK_SECONDS, sorted(seconds for seconds, _ in results)
    details = []
    for _, response in results:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["retry-after"] == "1"
        assert response.json()["code"] == "database_busy"
        details.append(response.json()["detail"])
    # All three waits ran out: threads busy, connections taken, the statement past its timeout.
    assert any("every database thread" in d for d in details), details
    assert any("no database connection was free" in d for d in details), details
    assert sum("statement timeout" in d for d in details) >= POOL, details
    assert recovered.status_code == 404 and recovered_seconds < 1.0
