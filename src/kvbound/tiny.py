"""Tiny random-init models built in code: fast tests, no download.

Each covers one family kvbound must handle. Weights use a wider init than the
default so greedy decoding is not dominated by near-ties.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               max_position_embeddings=1024, initializer_range=0.08, tie_word_embeddings=False)


def _llama(**kw) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**{**_COMMON, "num_attention_heads": 4, "num_key_value_heads": 2, **kw}))


def tiny_llama() -> PreTrainedModel:
    """Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    return _llama()


def tiny_mha() -> PreTrainedModel:
    """Llama-architecture multi-head attention: KV heads == query heads."""
    return _llama(num_key_value_heads=4)


def tiny_qwen3() -> PreTrainedModel:
    """Qwen3: GQA with per-head q_norm/k_norm."""
    return Qwen3ForCausalLM(Qwen3Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16))


def tiny_gemma3() -> PreTrainedModel:
    """Gemma3 text: sliding-window (window 6) and full-attention layers, per-type RoPE."""
    cfg = Gemma3TextConfig(
        **{**_COMMON, "num_hidden_layers": 4}, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )
    return Gemma3ForCausalLM(cfg)


def tiny_mistral() -> PreTrainedModel:
    """Mistral: every layer slides (window 8) from ``sliding_window`` alone, no ``layer_types``."""
    return MistralForCausalLM(MistralConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=8))


def tiny_qwen2() -> PreTrainedModel:
    """Qwen2 with ``use_sliding_window``: layers ``>= max_window_layers`` (1) slide (window 6), layer 0 is full."""
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2,
                                        use_sliding_window=True, sliding_window=6, max_window_layers=1))


def tiny_gpt2() -> PreTrainedModel:
    """GPT-2 (learned absolute positions, fused c_attn): a family kv-direct does not drive."""
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=0,
                                      initializer_range=0.08))


TINY: dict[str, Callable[[], PreTrainedModel]] = {
    "tiny-llama": tiny_llama,
    "tiny-qwen3": tiny_qwen3,
    "tiny-gemma3": tiny_gemma3,
    "tiny-mha": tiny_mha,
    "tiny-mistral": tiny_mistral,
    "tiny-qwen2": tiny_qwen2,
    "tiny-gpt2": tiny_gpt2,
}


def build_tiny(name: str, seed: int = 0, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Build tiny model ``name`` with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    model = TINY[name]()
    model.set_attn_implementation(attn_implementation)
    return model.eval()
