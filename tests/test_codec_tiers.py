"""Codecs as options of other tiers: the offload store (``codec=int8``), reported as lossy."""

import pytest
import torch

import kvbound
from kvbound import cli
from kvbound.cache.codec import parse_codec
from kvbound.errors import KVBoundError
from kvbound.speculative import speculative_greedy
from conftest import FAMILIES, prompt_ids, run_greedy, tiny

PROMPT, NEW, BUDGET = 24, 10, 5


def test_fp32_codec_stays_exact():
    model = tiny("tiny-gemma3")
    full = run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "full"), NEW)
    cache = kvbound.make_cache(model, "offload", BUDGET, codec="fp32")
    assert run_greedy(model, prompt_ids(PROMPT), cache, NEW) == full
    assert cache.exact and cache.memory_report()["exact"]
    cache.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_offload_is_close_lossy_and_stores_a_quarter(name):
    model = tiny(name)
    cache = kvbound.make_cache(model, "offload", BUDGET, codec="int8")
    plain = kvbound.make_cache(model, "offload", BUDGET)
    ref = kvbound.make_cache(model, "full")
    ids = prompt_ids(PROMPT)
    diffs = []
    with torch.no_grad():
        a, p, r = (model(ids, past_key_values=c).logits[:, -1] for c in (cache, plain, ref))
        for _ in range(6):  # decode steps read the spilled tokens back
            nxt = r.argmax(-1, keepdim=True)
            a, p, r = (model(nxt, past_key_values=c).logits[:, -1] for c in (cache, plain, ref))
            assert torch.equal(p, r) or (p - r).abs().max() < 1e-5
            diffs.append((a - r).abs().max().item())
    assert 0 < max(diffs) < 0.05
    assert not cache.exact and cache.memory_report()["exact"] is False and plain.exact
    codec = parse_codec("int8", 16)  # tiny models: head_dim 16, 2 or 4 KV heads
    layer = cache.layers[1]
    kvh = layer.keys.shape[1]
    stored = layer.store.end - layer.store.start
    assert layer.tiers()["offloaded"] == stored * 2 * kvh * codec.token_bytes(16)
    assert plain.layers[1].tiers()["offloaded"] == stored * 2 * kvh * 16 * 4
    cache.close()
    plain.close()


def test_lossy_offload_cannot_verify_speculation():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "offload", BUDGET, codec="int4")
    with pytest.raises(KVBoundError, match="made lossy by its options"):
        speculative_greedy(model, prompt_ids(PROMPT), cache, 4, k=2)
    cache.close()


@pytest.mark.parametrize("options,message", [
    ({"codec": "int3"}, "unknown format 'int3'"),
    ({"codec_group": 8}, "codec_group/codec_outliers apply to an integer codec"),
    ({"codec": "int8", "codec_outliers": 16}, "outliers must be a whole number of channels in 0..15"),
    ({"codec": "int4", "codec_group": 5}, "group 5 does not divide head_dim 16"),
    ({"codec": "bf16", "codec_group": 8}, "group and outliers apply to the integer formats"),
])
def test_bad_codec_options(options, message):
    with pytest.raises(KVBoundError, match=message):
        kvbound.make_cache(tiny("tiny-llama"), "offload", BUDGET, **options)


def test_cli_reports_a_codec_offload_as_lossy(capsys):
    code = cli.main(["generate", "--model", "tiny-llama", "--prompt", "hello there, how are you", "--policy", "offload",
                     "--budget", "4", "--option", "codec=int8", "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and '"exact": false' in out


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "snapkv", "expected-attention", "kvzip", "keydiff",
                                    "knorm"])
def test_eviction_hot_window_through_a_codec(policy):
    model = tiny("tiny-qwen3")  # head_dim 16, 2 KV heads, 3 layers
    plain = run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, policy, 8), NEW)
    assert run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, policy, 8, codec="fp32"), NEW) == plain
    cache = kvbound.make_cache(model, policy, 8, codec="int8")
    run_greedy(model, prompt_ids(PROMPT), cache, NEW)
    held = sum(layer.held() for layer in cache.layers)
    assert held == 3 * 8
    # the hot window holds each token's int8 codes + float16 scale and zero point, nothing else
    assert cache.bytes_by_tier()["hot_kv"] == held * 2 * 2 * parse_codec("int8", 16).token_bytes(16)
    assert not cache.exact


def test_codec_hot_window_follows_beams():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "h2o", 8, codec="int4")
    out = model.generate(prompt_ids(PROMPT), past_key_values=cache, max_new_tokens=5, num_beams=2, do_sample=False)
    assert out.shape == (1, PROMPT + 5)


@pytest.mark.parametrize("read", ["mmap", "pread"])
def test_codec_offload_decodes_lazy_blocks_like_the_concatenated_path(read, monkeypatch):
    """Tiered attention decodes a codec'd store DECODE_CHUNK tokens at a time into one reused buffer:
    same logits as an eager model, which concatenates the whole decoded span."""
    from kvbound.cache import offload

    monkeypatch.setattr(offload, "DECODE_CHUNK", 3)  # several lazy blocks per segment, one buffer
    ids = prompt_ids(PROMPT)
    logits, lazy = {}, []
    real = offload.OffloadLayer._decoder

    def counting(self, *args):
        lazy.append(1)
        return real(self, *args)

    monkeypatch.setattr(offload.OffloadLayer, "_decoder", counting)
    for attn in ["sdpa", "eager"]:
        model = tiny("tiny-llama", attn)
        cache = kvbound.make_cache(model, "offload", BUDGET, codec="int4", read=read)
        out = []
        with torch.no_grad():
            nxt = ids
            for _ in range(4):
                out.append(model(nxt, past_key_values=cache).logits[:, -1])
                nxt = out[-1].argmax(-1, keepdim=True)
        logits[attn] = torch.cat(out)
        if attn == "sdpa":
            assert len(lazy) >= 3 * 2  # many blocks per layer went through the shared buffer
            assert cache.memory_report()["peak_transient_bytes"] > 0
        cache.close()
    assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-4)


def test_dropped_page_cache_reads_back_the_same_tokens():
    model = tiny("tiny-llama")
    ids = prompt_ids(PROMPT)
    warm = kvbound.make_cache(model, "offload", BUDGET, codec="int8")
    cold = kvbound.make_cache(model, "offload", BUDGET, codec="int8")
    with torch.no_grad():
        a, b = (model(ids, past_key_values=c).logits[:, -1] for c in (warm, cold))
        for _ in range(4):
            cold.drop_page_cache()
            assert torch.equal(a, b)
            nxt = a.argmax(-1, keepdim=True)
            a, b = (model(nxt, past_key_values=c).logits[:, -1] for c in (warm, cold))
    warm.close()
    cold.close()
