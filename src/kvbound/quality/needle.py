"""RULER-style needle-in-a-haystack tasks, built in code (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?"; Kamradt's NIAH).

* ``single`` (RULER ``niah_single_1``): one key-value needle -- "One of the special magic numbers
  for {key} is: {value}." -- planted at a relative ``depth`` (0 = start, 1 = end of the haystack)
  in RULER's repeated noise haystack; the question asks for the key's value.
* ``multikey`` (RULER ``niah_multikey_1``): the same, plus ``keys - 1`` distractor needles with
  other keys and values at random depths; only the queried key's value counts.

The context is sized to ``length`` tokens of the model's tokenizer (the whole prompt, template and
question included, never more). The prompt goes through the tokenizer's chat template when it has
one, followed by RULER's answer prefix, and the answer is scored by greedy decoding through the
policy's cache (the prompt prefilled in chunks, so a bounded cache stays bounded): a hit when the
value's digits appear in the first ``answer_tokens`` generated tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ..errors import KVBoundError

KINDS = ("single", "multikey")
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.").split(". ")
NOISE = [s.rstrip(".") + "." for s in NOISE]
HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
_ADJECTIVES = ("quiet", "amber", "brisk", "silent", "hollow", "gentle", "frozen", "golden", "rusty", "lucky",
               "purple", "nimble", "stormy", "humble", "velvet", "bitter", "crimson", "distant", "eager", "fuzzy")
_NOUNS = ("harbor", "lantern", "meadow", "falcon", "violin", "glacier", "orchard", "compass", "thistle", "canyon",
          "ember", "sparrow", "quarry", "beacon", "walrus", "pepper", "saddle", "island", "marble", "tunnel")


@dataclass(frozen=True)
class NeedleTask:
    """One prompt: ``input_ids`` ``[1, n]`` with ``n <= length``; the answer is ``value``."""

    kind: str
    length: int
    depth: float
    key: str
    value: str
    input_ids: torch.Tensor = field(repr=False)
    distractors: tuple[tuple[str, str], ...] = ()

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def _key_values(rng: random.Random, n: int) -> list[tuple[str, str]]:
    keys = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], n)
    values = rng.sample(range(1_000_000, 10_000_000), n)
    return [(k, str(v)) for k, v in zip(keys, values)]


def _check(kind: str, length: int, depth: float, keys: int) -> None:
    if kind not in KINDS:
        raise KVBoundError(f"unknown needle task {kind!r}; tasks: {', '.join(KINDS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise KVBoundError(f"needle context length must be a whole number of tokens >= 1, got {length!r}")
    if not 0.0 <= float(depth) <= 1.0:
        raise KVBoundError(f"needle depth must be in [0, 1] (0 = start, 1 = end), got {depth!r}")
    if kind == "multikey" and keys < 2:
        raise KVBoundError(f"the multikey task needs keys >= 2 (one queried, the rest distractors), got {keys}")


def _render(tokenizer, body: str, key: str) -> str:
    user = HEADER + body + QUESTION.format(key=key)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = user + "\n"
    return prompt + ANSWER_PREFIX.format(key=key).lstrip()


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_task(tokenizer, length: int, depth: float, kind: str = "single", seed: int = 0, keys: int = 4) -> NeedleTask:
    """Build a ``kind`` task of at most ``length`` tokens with the queried needle at ``depth``.

    Deterministic in ``(length, depth, kind, seed)``. Raises :class:`KVBoundError` when ``length``
    cannot hold the template, the needles and the question.
    """
    _check(kind, length, depth, keys)
    rng = random.Random(f"{seed}/{kind}/{length}/{depth:.6f}")
    pairs = _key_values(rng, keys if kind == "multikey" else 1)
    key, value = pairs[0]

    def build(n: int) -> tuple[str, list[int]]:
        sentences = [NOISE[i % len(NOISE)] for i in range(n)]
        slots = {round(depth * n): [NEEDLE.format(key=key, value=value)]}
        other = random.Random(f"{seed}/{kind}/{length}/{depth:.6f}/distractors")
        for k, v in pairs[1:]:
            slots.setdefault(other.randint(0, n), []).insert(0, NEEDLE.format(key=k, value=v))
        parts = []
        for i in range(n + 1):
            parts += slots.get(i, [])
            if i < n:
                parts.append(sentences[i])
        text = _render(tokenizer, " ".join(parts), key)
        return text, _encode(tokenizer, text)

    _, bare = build(0)
    if len(bare) > length:
        raise KVBoundError(f"a {kind} needle task needs at least {len(bare)} tokens with this tokenizer; "
                           f"length {length} is too short")
    per_sentence = max(1.0, (len(build(len(NOISE))[1]) - len(bare)) / len(NOISE))
    n = int((length - len(bare)) / per_sentence)
    ids = build(n)[1]
    while len(ids) > length and n > 0:  # the estimate can overshoot by a few tokens
        n = max(0, n - 1 - int((len(ids) - length) / per_sentence))
        ids = build(n)[1]
    return NeedleTask(kind, length, float(depth), key, value, torch.tensor([ids]), tuple(pairs[1:]))


def answer_tokens(tokenizer, task: NeedleTask) -> int:
    """How many tokens to generate: the value's own tokens plus a little slack."""
    return len(_encode(tokenizer, " " + task.value)) + 3


def found(task: NeedleTask, text: str) -> bool:
    """RULER's string-match score: the value appears in the answer (digits compared as text)."""
    return task.value in "".join(ch for ch in text if not ch.isspace())


@dataclass(frozen=True)
class NeedleOutcome:
    found: bool
    answer: str
    seconds: float


def run_task(model, tokenizer, task: NeedleTask, cache, prefill_chunk: int | None = 256,
             max_new_tokens: int | None = None) -> NeedleOutcome:
    """Answer ``task`` greedily through ``cache`` (fresh); the prompt is prefilled ``prefill_chunk``
    tokens per forward pass (``None``: one pass, which lets every prompt token see every other)."""
    from ..generation import greedy

    n = max_new_tokens or answer_tokens(tokenizer, task)
    ids = task.input_ids.to(next(model.parameters()).device)
    start = time.perf_counter()
    new = greedy(model, ids, cache, n, stop_at_eos=True, prefill_chunk=prefill_chunk)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    return NeedleOutcome(found(task, answer), answer, seconds)
