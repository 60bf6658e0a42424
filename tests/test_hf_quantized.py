"""hf-quantized: transformers' QuantizedCache through kvbound, its byte count and its errors."""

import pytest
import torch

import kvbound
from kvbound import cli
from kvbound.cache import hf_quantized
from kvbound.errors import KVBoundError
from conftest import prompt_ids, run_greedy, tiny

PROMPT, NEW = 40, 8


def test_fp8_counts_every_stored_byte():
    model = tiny("tiny-llama")  # 3 layers, 2 KV heads, head_dim 16
    cache = kvbound.make_cache(model, "hf-quantized", backend="fp8")
    tokens = run_greedy(model, prompt_ids(PROMPT), cache, NEW)
    assert len(tokens) == NEW
    seen = PROMPT + NEW - 1
    # float8 K and V (1 byte per value) plus one float32 scale each, per layer
    assert cache.bytes_by_tier() == {"hot_kv": 0, "quantized": 3 * 2 * (2 * seen * 16 + 4)}


@pytest.mark.parametrize("backend,module", [
    ("hqq", "hqq"),
    pytest.param("quanto", "optimum.quanto", marks=pytest.mark.long),  # first use compiles quanto's extension (~2 min)
])
def test_group_wise_backends_run_and_report_a_quantized_tier(backend, module):
    pytest.importorskip(module)
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "hf-quantized", backend=backend, bits=4, residual=8)
    assert len(run_greedy(model, prompt_ids(PROMPT), cache, NEW)) == NEW
    tiers = cache.bytes_by_tier()
    full = cache.kv_bytes_per_token * (PROMPT + NEW - 1)
    assert 0 < tiers["quantized"] < full / 2 and tiers["hot_kv"] < full / 2


def test_missing_library_names_the_extra(monkeypatch):
    layer, bits, _ = hf_quantized.BACKENDS["quanto"]
    monkeypatch.setitem(hf_quantized.BACKENDS, "quanto", (layer, bits, lambda: False))
    with pytest.raises(KVBoundError, match=r"pip install 'kvbound\[quant\]'"):
        kvbound.make_cache(tiny("tiny-llama"), "hf-quantized", backend="quanto")


@pytest.mark.parametrize("name,options,message", [
    ("tiny-gemma3", {}, "refuses models with sliding-window layers; use --policy kivi"),
    ("tiny-llama", {"backend": "quanto", "bits": 8}, "takes bits 2/4"),
    ("tiny-llama", {"backend": "fp8", "bits": 4}, "takes no bits"),
    ("tiny-llama", {"backend": "gguf"}, "backend must be one of quanto, hqq, fp8"),
    ("tiny-llama", {"backend": "hqq", "group": 12}, "group 12 does not divide head_dim 16"),
])
def test_bad_input(name, options, message):
    with pytest.raises(KVBoundError, match=message):
        kvbound.make_cache(tiny(name), "hf-quantized", **options)


def test_cli_runs_it(capsys):
    code = cli.main(["generate", "--model", "tiny-llama", "--prompt", "hello there", "--policy", "hf-quantized",
                     "--option", "backend=fp8", "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and '"quantized"' in out


def test_held_bytes_unflattens_tensor_subclasses():
    x = torch.zeros(4, 8, dtype=torch.float16)
    assert hf_quantized.held_bytes((x, {"scale": torch.zeros(4), "shape": (4, 8)}, [x])) == 64 + 16 + 64
