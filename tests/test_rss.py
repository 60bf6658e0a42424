"""Process-memory helpers (:mod:`kvbound.rss`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvbound.errors import KVBoundError
from kvbound.rss import returned_transients

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Frees an 8 MiB tensor (glibc then raises its mmap threshold to 8 MiB), then allocates 64 x 2 MiB,
# frees all but the newest and prints the RSS still added, in MiB: with glibc's default ("default")
# or inside returned_transients(), after a nested one ended, and again after it ("context").
_FRAGMENT = """
import sys, torch
from kvbound.rss import current_rss_bytes, returned_transients

def kept():
    base = current_rss_bytes()
    blocks = [torch.ones(2 << 18) for _ in range(64)]
    keep = blocks[-1]
    del blocks
    return (current_rss_bytes() - base) >> 20, keep

big = torch.ones(8 << 18); del big
if sys.argv[1] == "default":
    print(kept()[0])
else:
    with returned_transients(1 << 20) as applied:
        with returned_transients(1 << 20):  # a nested one (prefill inside generate) restores nothing
            pass
        inside, b = kept()
    print(inside, kept()[0], applied)
"""


def _run(mode: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_returned_transients_gives_freed_tensors_back_to_the_os():
    assert int(_run("default")[0]) >= 64  # glibc kept the freed 2 MiB blocks in its heap
    inside, after, applied = _run("context")
    assert applied == "True"
    assert int(inside) <= 16  # each block had its own mapping, unmapped when freed
    assert int(after) >= 64  # decoding gets glibc's large threshold back: blocks are reused from the heap


def test_mmap_threshold_setting_is_checked(monkeypatch):
    monkeypatch.setenv("KVBOUND_MMAP_THRESHOLD", "lots")
    with pytest.raises(KVBoundError, match="KVBOUND_MMAP_THRESHOLD"):
        with returned_transients():
            pass
    monkeypatch.setenv("KVBOUND_MMAP_THRESHOLD", "0")
    with returned_transients() as applied:
        assert applied is False


@pytest.mark.parametrize("policy, resets", [("full", 1), ("offload", 1), ("kv-direct", 0)])
def test_decoding_keeps_mapped_transients_only_for_policies_that_rerun_the_model(policy, resets, monkeypatch):
    """``generate`` gives glibc its large threshold back at the first token, except for a policy
    whose every step re-runs the model over the evicted span (prefill-sized transients each step)."""
    import kvbound
    from kvbound import generation
    from conftest import prompt_ids, tiny

    calls = []
    monkeypatch.setattr(generation, "decoding_threshold", lambda: calls.append(1))
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, policy, budget=None if policy == "full" else 4)
    generation.greedy(model, prompt_ids(12), cache, 4, stop_at_eos=False)
    cache.close()
    assert len(calls) == resets
