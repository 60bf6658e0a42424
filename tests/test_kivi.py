"""kivi: quantized K/V with a full-precision residual, on every family (Gemma 3 sliding layers too)."""

import pytest
import torch

import kvbound
from kvbound import cli
from kvbound.errors import KVBoundError
from conftest import FAMILIES, prompt_ids, run_greedy, tiny

PROMPT, NEW = 40, 12


def step_logits(model, cache, ids, steps):
    """Logits of the prompt's last position and of ``steps`` teacher-forced decode steps."""
    ref = kvbound.make_cache(model, "full")
    out = []
    with torch.no_grad():
        a, b = model(ids, past_key_values=cache).logits[:, -1], model(ids, past_key_values=ref).logits[:, -1]
        out.append((a, b))
        for _ in range(steps):
            nxt = b.argmax(-1, keepdim=True)
            a, b = model(nxt, past_key_values=cache).logits[:, -1], model(nxt, past_key_values=ref).logits[:, -1]
            out.append((a, b))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_residual_covering_everything_is_the_full_cache(name):
    model = tiny(name)
    cache = kvbound.make_cache(model, "kivi", residual=PROMPT + NEW)
    full = run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "full"), NEW)
    assert run_greedy(model, prompt_ids(PROMPT), cache, NEW) == full
    assert cache.bytes_by_tier()["quantized"] == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_error_shrinks_with_bits_and_int8_is_close(name):
    model = tiny(name)
    worst = {}
    for bits in (8, 4, 2):
        cache = kvbound.make_cache(model, "kivi", bits=bits, residual=4)
        worst[bits] = max((a - b).abs().max().item() for a, b in step_logits(model, cache, prompt_ids(PROMPT), 6))
        assert cache.bytes_by_tier()["quantized"] > 0
    assert 0 < worst[8] < 0.05
    assert worst[8] < worst[4] < worst[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_bytes_are_counted_exactly(bits):
    model = tiny("tiny-llama")  # head_dim 16, 2 KV heads, 3 layers
    residual, group = 8, 16
    cache = kvbound.make_cache(model, "kivi", bits=bits, residual=residual)
    run_greedy(model, prompt_ids(PROMPT), cache, NEW)
    seen, d, kvh, layers = PROMPT + NEW - 1, 16, 2, 3
    nq = (seen - residual) // group * group
    per_layer = 2 * (nq * kvh * d * bits // 8)  # K and V codes
    per_layer += 2 * 2 * 2 * (nq * kvh * d // group)  # K and V: float16 scale + zero point per group
    tiers = cache.bytes_by_tier()
    assert tiers["quantized"] == layers * per_layer
    assert tiers["hot_kv"] == layers * 2 * kvh * (seen - nq) * d * 4
    assert residual <= seen - nq < residual + group


def test_gemma3_sliding_layers_hold_only_the_window():
    model = tiny("tiny-gemma3")  # window 6, head_dim 16
    cache = kvbound.make_cache(model, "kivi", bits=4, residual=0, group=4)
    for a, b in step_logits(model, cache, prompt_ids(PROMPT), 8):
        assert (a - b).abs().max() < 1.0  # quantized, but no unmasked out-of-window token
    for layer in cache.layers:
        if layer.sliding_window is not None:
            assert 0 < layer.past_visible() <= (6 - 1) + 4 - 1
            assert layer.quantized_tokens() > 0
        else:
            assert layer.past_visible() == PROMPT + 8


@pytest.mark.parametrize("chunk", [7, 16])
def test_gemma3_chunked_prefill_masks_each_layer_kind(chunk):
    """Multi-token steps longer than the window: transformers builds the sliding mask from a layer
    that says ``is_sliding`` (a kivi layer that did not failed with a size mismatch)."""
    model = tiny("tiny-gemma3")  # window 6
    cache = kvbound.make_cache(model, "kivi", bits=8, residual=4, group=4)
    full = kvbound.generation.greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "full"), 4,
                                     stop_at_eos=False, prefill_chunk=chunk)
    out = kvbound.generation.greedy(model, prompt_ids(PROMPT), cache, 4, stop_at_eos=False, prefill_chunk=chunk)
    assert [layer.is_sliding for layer in cache.layers] == [t == "sliding_attention" for t in model.config.layer_types]
    assert out.shape == full.shape and cache.bytes_by_tier()["quantized"] > 0


def test_beam_search_runs():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "kivi", bits=4, residual=4)
    out = model.generate(prompt_ids(PROMPT), past_key_values=cache, max_new_tokens=6, num_beams=2, do_sample=False)
    assert out.shape == (1, PROMPT + 6)


@pytest.mark.parametrize("options,budget,message", [
    ({"bits": 3}, None, "bits must be one of 2, 4, 8"),
    ({"group": 5}, None, "group 5 does not divide head_dim 16"),
    ({"residual": -1}, None, "residual must be a whole number"),
    ({"clip": "yes"}, None, "clip must be true or false"),
    ({}, 64, "takes no budget"),
    ({"window": 3}, None, "unknown option"),
])
def test_bad_input(options, budget, message):
    with pytest.raises(KVBoundError, match=message):
        kvbound.make_cache(tiny("tiny-llama"), "kivi", budget, **options)


def test_cli_one_line_error(capsys):
    code = cli.main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--policy", "kivi", "--option", "bits=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bits must be one of 2, 4, 8" in err[0]


def test_registry_says_no_budget_and_lossy():
    spec = kvbound.cache.registered()["kivi"]
    assert not spec.exact and not spec.needs_budget
