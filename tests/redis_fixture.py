"""A real ``redis-server`` on a unix socket in a temporary folder, started and stopped by the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(folder, port: int = 0):
    """Yields the server's URL: ``unix://<folder>/redis.sock`` (``port`` 0) or ``redis://127.0.0.1:<port>/0``."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (.ci/run installs it: apt-get install -y redis-server)")
    sock = os.path.join(str(folder), "redis.sock")
    proc = subprocess.Popen([exe, "--port", str(port), "--unixsocket", sock, "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)
    try:
        yield f"unix://{sock}" if port == 0 else f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
