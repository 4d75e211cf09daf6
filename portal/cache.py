"""A Redis cache that fails open.

The cache holds rate-limit counters and used TOTP codes, nothing that must survive.
When Redis is down, a submission must still succeed (its notification waits in the
outbox), so cache errors are logged and treated as a miss instead of failing the
request. Sessions are in the database, not here.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.cache.backends.redis import RedisCache
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class FailOpenRedisCache(RedisCache):
    def _degraded(self, operation: str, default: Any) -> Any:
        logger.warning(
            "cache unavailable during %s; continuing without it", operation, exc_info=True
        )
        return default

    def get(self, key, default=None, version=None):
        try:
            return super().get(key, default, version)
        except _UNAVAILABLE:
            return self._degraded("get", default)

    def get_many(self, keys, version=None):
        try:
            return super().get_many(keys, version)
        except _UNAVAILABLE:
            return self._degraded("get_many", {})

    def set(self, key, value, timeout=None, version=None):  # noqa: A003
        try:
            return super().set(key, value, timeout, version)
        except _UNAVAILABLE:
            return self._degraded("set", None)

    def set_many(self, data, timeout=None, version=None):
        try:
            return super().set_many(data, timeout, version)
        except _UNAVAILABLE:
            return self._degraded("set_many", [])

    def add(self, key, value, timeout=None, version=None):
        try:
            return super().add(key, value, timeout, version)
        except _UNAVAILABLE:
            return self._degraded("add", True)

    def incr(self, key, delta=1, version=None):
        try:
            return super().incr(key, delta, version)
        except _UNAVAILABLE:
            return self._degraded("incr", delta)

    def delete(self, key, version=None):
        try:
            return super().delete(key, version)
        except _UNAVAILABLE:
            return self._degraded("delete", False)

    def touch(self, key, timeout=None, version=None):
        try:
            return super().touch(key, timeout, version)
        except _UNAVAILABLE:
            return self._degraded("touch", False)

    def has_key(self, key, version=None):
        try:
            return super().has_key(key, version)
        except _UNAVAILABLE:
            return self._degraded("has_key", False)
