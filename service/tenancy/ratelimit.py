"""Requests per API key: a fixed window counted in Redis, so every API process shares one count.

The embedded stack has no Redis; there one process serves the API, and an in-process count is the same thing.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache

from service.errors import RateLimited
from service.settings import Settings


@lru_cache
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=2)


class _LocalWindows:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def incr(self, key_id: str, window: int) -> int:
        with self.lock:
            for stale in [k for k in self.counts if k[1] < window]:
                del self.counts[stale]
            self.counts[(key_id, window)] = self.counts.get((key_id, window), 0) + 1
            return self.counts[(key_id, window)]


_local = _LocalWindows()


def _count(settings: Settings, key_id: str, window: int) -> int:
    if not settings.redis_url:
        return _local.incr(key_id, window)
    name = f"ftjobs:rate:{key_id}:{window}"
    pipe = _redis(settings.redis_url).pipeline()
    pipe.incr(name)
    pipe.expire(name, settings.rate_limit_window_seconds + 1)
    return int(pipe.execute()[0])


def check_rate(settings: Settings, key_id: str) -> None:
    """Count this request against the key's window; RateLimited with the seconds until the next window."""
    now, width = time.time(), settings.rate_limit_window_seconds
    window = int(now // width)
    if _count(settings, key_id, window) > settings.rate_limit_requests:
        retry_after = max(1, int((window + 1) * width - now + 0.999))
        raise RateLimited(f"more than {settings.rate_limit_requests} requests in {width} s for this key",
                          retry_after_seconds=retry_after)
