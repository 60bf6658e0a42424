"""Shared fixtures: tiny random-init models (built once per session) and a greedy helper."""

from __future__ import annotations

import functools

import pytest
import torch

from kvbound.generation import greedy
from kvbound.tiny import build_tiny

FAMILIES = ["tiny-llama", "tiny-qwen3", "tiny-gemma3", "tiny-mha"]


@functools.lru_cache(maxsize=None)
def tiny(name: str, attn: str = "sdpa"):
    return build_tiny(name, attn_implementation=attn)


def prompt_ids(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def run_greedy(model, ids, cache, n: int = 16) -> list[int]:
    return greedy(model, ids, cache, n, stop_at_eos=False)[0].tolist()


@functools.lru_cache(maxsize=None)
def real_model():
    """The bundled SmolLM2-135M ``(model, tokenizer)``, loaded once per session (slow tests only)."""
    from kvbound import models

    return models.load("smollm2-135m")


@pytest.fixture(params=FAMILIES)
def family(request):
    return tiny(request.param)


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from intra-op threads (and spin-waiting threads slow a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kv_home(tmp_path, monkeypatch):
    """``KVBOUND_HOME`` in the test's own folder (razor's head maps are cached there)."""
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path))
    return tmp_path
