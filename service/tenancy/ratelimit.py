"""Requests per API key: a fixed window counted in Redis, so every API process shares one count.

A request is counted by the hash of the key it presents, before the database is asked whether the key is
valid (a key nobody holds only ever fills its own window), in the thread that then runs the request's database
work: one INCR, and no extra suspension of the request's coroutine chain in the event loop.

The embedded stack has no Redis; there one process serves the API, and an in-process count is the same thing.
"""

from __future__ import annotations

import logging
import threading
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import RateLimited
from service.settings import Settings

log = logging.getLogger(__name__)
OUTAGE_LOG_SECONDS = 10.0


class _LocalWindows:
    """Counts in this process: only for the embedded stack, whose single process serves every request."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def incr(self, key: str, window: int) -> int:
        with self.lock:
            for stale in [k for k in self.counts if k[1] < window]:
                del self.counts[stale]
            self.counts[(key, window)] = self.counts.get((key, window), 0) + 1
            return self.counts[(key, window)]


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.limit, self.width = settings.rate_limit_requests, settings.rate_limit_window_seconds
        self._local = _LocalWindows()
        self._redis = None
        self._outage_logged_at = 0.0
        if settings.redis_url:
            import redis

            # A short timeout: a stalled Redis delays each request by at most this before it is served anyway.
            self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def hit(self, key_sha256: str) -> None:
        """Count one request; RateLimited, with the seconds until the next window, past the limit."""
        now = time.time()
        window = int(now // self.width)
        try:
            count = self._count(key_sha256, window)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            return self._fail_open(error)
        if count > self.limit:
            retry_after = max(1, int((window + 1) * self.width - now + 0.999))
            raise RateLimited(
                f"more than {self.limit} requests in {self.width} s for this key", retry_after_seconds=retry_after
            )

    def _fail_open(self, error: Exception) -> None:
        """While Redis is unreachable (restarting), requests are served uncounted rather than refused: polling a
        job's status must not fail because the limiter's store is down. Logged once per OUTAGE_LOG_SECONDS."""
        if time.monotonic() - self._outage_logged_at > OUTAGE_LOG_SECONDS:
            self._outage_logged_at = time.monotonic()
            log.warning("rate limits not enforced: Redis is unreachable (%s)", error)

    def _count(self, key_sha256: str, window: int) -> int:
        if self._redis is None:
            return self._local.incr(key_sha256, window)
        name = f"ftjobs:rate:{key_sha256[:32]}:{window}"
        count = int(self._redis.incr(name))
        if count == 1:
            # Only the window's first request sets its expiry: one command per request. Were this one lost
            # (a crash in between), the key would only linger; its window number keeps it out of later counts.
            self._redis.expire(name, self.width + 1)
        return count

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
