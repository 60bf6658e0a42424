"""A real ``redis-server`` on a unix socket in a temporary folder, started and stopped by the test."""

from __future__ import annotations

import contextlib
import shutil

import pytest

from kvbound.bench.scenarios.cluster import free_port, spawn_redis

__all__ = ["free_port", "redis_server"]


@contextlib.contextmanager
def redis_server(folder):
    """Yields the URL (``unix://<folder>/redis.sock``) of a fresh Redis; skips where none is installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it: apt-get install -y redis-server)")
    with spawn_redis(str(folder)) as url:
        yield url
