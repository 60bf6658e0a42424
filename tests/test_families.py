"""Families (issue 10): each layer's attention type derived as transformers does, and the exact
policies token-identical to ``full`` on Mistral (every layer slides, no ``layer_types``) and
Qwen2 (``use_sliding_window`` + ``max_window_layers``) with windows smaller than the context."""

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import kvbound
from conftest import prompt_ids, run_greedy, tiny
from kvbound.cache import exact_policies
from kvbound.cache.model_info import layer_windows
from kvbound.models import load
from kvbound.recompute import attention_types

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_FAMILIES = ["tiny-mistral", "tiny-qwen2"]
PROMPT, NEW = 20, 12  # context 32 > windows 8 (Mistral) and 6 (Qwen2)
SMALL = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("config, expected", [
    (MistralConfig(**SMALL, sliding_window=8), [8] * 4),
    (MistralConfig(**SMALL, sliding_window=None), [None] * 4),
    (Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=2), [None, None, 6, 6]),
    (Qwen2Config(**SMALL, use_sliding_window=False, sliding_window=6, max_window_layers=2), [None] * 4),
    (Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=5, max_window_layers=3), [None] * 3 + [5]),
    (Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 7}, sliding_window=9), [9] * 5 + [None] + [9]),
    (LlamaConfig(**SMALL), [None] * 4),
], ids=["mistral", "mistral-no-window", "qwen2", "qwen2-off", "qwen3", "gemma3-pattern", "llama"])
def test_layer_windows_follow_transformers(config, expected):
    class Model:  # layer_windows reads only the config
        pass

    model = Model()
    model.config = config
    assert layer_windows(model) == expected


@pytest.mark.parametrize("name", NEW_FAMILIES + ["tiny-gemma3"])
def test_layer_windows_match_the_modules(name):
    """Where transformers' attention modules carry their window, ours is the same per layer."""
    model = tiny(name)
    cfg = model.config
    for i, (w, layer) in enumerate(zip(layer_windows(model), model.model.layers)):
        module_window = getattr(layer.self_attn, "sliding_window", cfg.sliding_window)  # Mistral: the config's
        assert w == module_window, i
    assert attention_types(cfg).count("sliding_attention") == sum(w is not None for w in layer_windows(model))


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_full_policy_matches_transformers_default_cache(name):
    model, ids = tiny(name), prompt_ids(PROMPT + NEW)
    with torch.no_grad():
        ref = model(ids).logits  # transformers' own DynamicCache and masks
        cache = kvbound.make_cache(model, "full")
        out = torch.cat([model(ids[:, :PROMPT], past_key_values=cache).logits]
                        + [model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(PROMPT, PROMPT + NEW)], 1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 5, PROMPT + NEW])
@pytest.mark.parametrize("name", NEW_FAMILIES)
@pytest.mark.parametrize("policy", exact_policies())
def test_exact_policies_match_full(policy, name, budget):
    model = tiny(name)
    ref = run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "full"), NEW)
    cache = kvbound.make_cache(model, policy, budget)
    assert run_greedy(model, prompt_ids(PROMPT), cache, NEW) == ref
    cache.close()


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_families_load_by_name(name):
    model, tok = load(name)
    assert tok("hi", return_tensors="pt")["input_ids"].shape[1] >= 2
    assert model.config.model_type == name.removeprefix("tiny-")
