"""RULER's synthetic tasks, generated in code with fixed seeds (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?", https://arxiv.org/abs/2404.06654).

Every sample is a prompt of at most ``length`` tokens of the model's tokenizer (context plus
question, chat template included), split in two parts: ``context_ids`` (what a ``compress``
protocol compresses: the template's opening, the task's instruction and the haystack) and
``question_ids`` (the question, the end of the user turn and RULER's answer prefix), tokenized
separately as kvpress does. ``references`` are the strings the answer must contain.

Tasks (RULER's names; the haystacks and words are built from text kvbound ships offline):

* ``niah_single_1`` -- one word-key -> 7-digit-number needle in RULER's repeated noise sentences;
* ``niah_single_2`` -- the same in an essay haystack (KJV prose, :mod:`kvbound.quality.corpus`);
* ``niah_single_3`` -- word key -> UUID value, essay haystack;
* ``niah_multikey_1`` -- 4 needles with different keys, one asked, essay haystack;
* ``niah_multikey_2`` -- the haystack is made of distractor needles (word keys, number values);
* ``niah_multikey_3`` -- the same with UUID keys and UUID values;
* ``niah_multivalue`` -- one key with 4 values, all asked;
* ``niah_multiquery`` -- 4 needles, all 4 keys asked;
* ``vt`` -- variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) in
  noise; the answer is every variable that holds the value;
* ``cwe`` -- common-words extraction: a numbered list where 10 words appear 30 times and the
  others 3 times; the answer is the 10 common words;
* ``fwe`` -- frequent-words extraction: coded 6-letter words drawn Zipf(alpha 2), the most
  frequent one being the noise ``...``; the answer is ranks 2-4.

Scoring (:func:`score`) is RULER's ``string_match_all``: the fraction of references that occur in
the prediction, case-insensitive; a task's score is the mean over its samples (RULER reports x100).
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from ..errors import KVBoundError

NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery")
TASKS = (*NIAH_TASKS, "vt", "cwe", "fwe")
SINGLE_NEEDLE = ("niah_single_1", "niah_single_2", "niah_single_3")
# tokens generated per task (RULER: niah 128, vt 30, cwe 120, fwe 50; the niah answers here are shorter
# and greedy decoding stops at the end-of-turn token)
ANSWER_TOKENS = {**{t: 64 for t in NIAH_TASKS}, "niah_multivalue": 96, "niah_multiquery": 96,
                 "vt": 30, "cwe": 120, "fwe": 50}

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
ESSAY_BOOKS = ("Acts", "Romans", "Hebrews", "Luke", "John")  # KJV prose, concatenated as needed

NIAH_HEADER = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {kind} afterwards.\n")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"

VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are:")

CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_HEADER = ("Read the following coded text and track the frequency of each coded word. Find the three most "
              "frequently appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class RulerSample:
    """One prompt: ``context_ids`` + ``question_ids`` (at most ``length`` tokens together)."""

    task: str
    length: int
    index: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    references: tuple[str, ...]
    max_new_tokens: int

    @property
    def input_ids(self) -> torch.Tensor:
        """The whole prompt, ``[1, n]``."""
        return torch.tensor([self.context_ids + self.question_ids])

    @property
    def tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


def score(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the fraction of ``references`` found in
    ``prediction``, case-insensitive (1.0 when every reference appears)."""
    if not references:
        raise KVBoundError("a RULER sample needs at least one reference answer")
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise KVBoundError(f"unknown RULER task {task!r}; valid tasks: {', '.join(TASKS)}")


# --------------------------------------------------------------------------- offline text


@lru_cache(maxsize=1)
def _essay_sentences() -> tuple[str, ...]:
    from . import corpus

    text = "\n\n".join(corpus.book_text(b) for b in ESSAY_BOOKS)
    return tuple(s for s in re.split(r"(?<=[.;:?!])\s+", text) if s)


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the essay text, sorted: keys and list words."""
    words = {w.lower() for s in _essay_sentences() for w in re.findall(r"[A-Za-z]+", s)}
    return tuple(sorted(w for w in words if 4 <= len(w) <= 10))


def _word_keys(rng: random.Random, n: int) -> list[str]:
    vocab = _vocabulary()
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n:
        key = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def _numbers(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]


def _uuids(rng: random.Random, n: int) -> list[str]:
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


# --------------------------------------------------------------------------- prompt assembly


def _render(tokenizer, header: str, body: str, question: str, prefix: str) -> tuple[list[int], list[int]]:
    """Context ids and question ids of ``header + body + question`` as one user turn (chat template
    when the tokenizer has one) followed by the answer ``prefix``."""
    user = header + body + question
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = user + "\n"
    cut = prompt.rindex(question)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return encode(prompt[:cut]), encode(prompt[cut:] + prefix.lstrip())


def _fit(build: Callable[[int], tuple[list[int], list[int]]], length: int, task: str,
         upper: int) -> tuple[list[int], list[int]]:
    """The largest haystack size ``n`` in ``[0, upper]`` whose prompt fits ``length`` tokens (bisection)."""
    ctx, q = build(0)
    if len(ctx) + len(q) > length:
        raise KVBoundError(f"RULER task {task} needs at least {len(ctx) + len(q)} tokens with this tokenizer; "
                           f"length {length} is too short")
    lo, hi, best = 0, upper, (ctx, q)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ctx, q = build(mid)
        if len(ctx) + len(q) <= length:
            lo, best = mid, (ctx, q)
        else:
            hi = mid - 1
    return best


def _insert(units: list[str], needles: list[str], depths: list[float]) -> str:
    """``units`` joined by spaces with each needle placed before unit ``round(depth * len(units))``."""
    slots: dict[int, list[str]] = {}
    for needle, depth in zip(needles, depths):
        slots.setdefault(round(depth * len(units)), []).append(needle)
    parts: list[str] = []
    for i in range(len(units) + 1):
        parts += slots.get(i, [])
        if i < len(units):
            parts.append(units[i])
    return " ".join(parts)


# --------------------------------------------------------------------------- the tasks


def _niah(tokenizer, task: str, length: int, rng: random.Random):
    n_keys = {"niah_multikey_1": 4, "niah_multiquery": 4}.get(task, 1)
    n_values = 4 if task == "niah_multivalue" else 1
    uuid_keys = task == "niah_multikey_3"
    uuid_values = task in ("niah_single_3", "niah_multikey_3")
    kind = "uuids" if uuid_values else "numbers"
    keys = _uuids(rng, n_keys) if uuid_keys else _word_keys(rng, n_keys)
    draw = _uuids if uuid_values else _numbers
    needles = [(k, v) for k in keys for v in draw(rng, n_values)]
    rng.shuffle(needles)
    depths = [rng.random() for _ in needles]
    query_keys = keys if task == "niah_multiquery" else keys[:1]
    references = tuple(v for k, v in needles if k in query_keys)
    query = ", ".join(query_keys[:-1]) + f", and {query_keys[-1]}" if len(query_keys) > 1 else query_keys[0]
    header, question = NIAH_HEADER.format(kind=kind), NIAH_QUESTION.format(kind=kind, query=query)
    prefix = NIAH_PREFIX.format(kind=kind, query=query)
    texts = [NEEDLE.format(kind=kind, key=k, value=v) for k, v in needles]

    if task == "niah_single_1":
        units, upper = [s + "." for s in NOISE.split(". ") if s.strip()], length
        unit = lambda i: units[i % len(units)]  # noqa: E731
    elif task in ("niah_multikey_2", "niah_multikey_3"):  # a haystack of distractor needles
        hay = random.Random(rng.random())
        cache: list[str] = []

        def unit(i: int) -> str:
            while len(cache) <= i:
                k = _uuids(hay, 1)[0] if uuid_keys else _word_keys(hay, 1)[0]
                if k not in keys:
                    cache.append(NEEDLE.format(kind=kind, key=k, value=draw(hay, 1)[0]))
            return cache[i]

        upper = length // 8
    else:
        sentences = _essay_sentences()
        unit, upper = (lambda i: sentences[i % len(sentences)]), length // 4  # noqa: E731

    build = lambda n: _render(tokenizer, header, _insert([unit(i) for i in range(n)], texts, depths),  # noqa: E731
                              question, prefix)
    return build, upper, references


def _vt(tokenizer, length: int, rng: random.Random, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = _numbers(rng, 1)[0]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in chain)  # in order: each assignment after the one it copies
    units = [s + "." for s in NOISE.split(". ") if s.strip()]
    build = lambda n: _render(tokenizer, VT_HEADER, _insert([units[i % len(units)] for i in range(n)], chain, depths),  # noqa: E731
                              VT_QUESTION.format(value=value), VT_PREFIX.format(n=len(names), value=value))
    return build, length, tuple(names)


def _cwe(tokenizer, length: int, rng: random.Random, n_common: int = 10, freq_common: int = 30, freq_rare: int = 3):
    vocab = list(_vocabulary())
    rng.shuffle(vocab)
    common, rare = vocab[:n_common], vocab[n_common:]

    def build(n: int, freq: int = freq_common) -> tuple[list[int], list[int]]:
        words = [w for w in common for _ in range(freq)] + [w for w in rare[:n] for _ in range(freq_rare)]
        random.Random(f"{n}/{freq}/{common[0]}").shuffle(words)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return _render(tokenizer, CWE_HEADER, body, CWE_QUESTION, CWE_PREFIX)

    # shorter contexts than 10 x 30 list entries get fewer repeats of the common words (>= 2 more than the rare)
    freq = freq_common
    while freq > freq_rare + 2 and sum(map(len, build(0, freq))) > length:
        freq -= 1
    return (lambda n: build(n, freq)), min(len(rare), length), tuple(common)


def _fwe(tokenizer, length: int, rng: random.Random, alpha: float = 2.0, vocab_size: int = 2000):
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    vocab[0] = "..."  # the top rank is noise
    zeta = sum(k ** -alpha for k in range(1, 100_000)) + 1e5 ** (1 - alpha) / (alpha - 1)  # zeta(2) = pi^2/6

    def build(n: int) -> tuple[list[int], list[int]]:
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k ** -alpha / zeta))]
        random.Random(n).shuffle(words)
        return _render(tokenizer, FWE_HEADER, " ".join(words), FWE_QUESTION, FWE_PREFIX)

    return build, 4 * length, tuple(vocab[1:4])


def make_sample(tokenizer, task: str, length: int, index: int = 0, seed: int = 0) -> RulerSample:
    """Sample ``index`` of ``task`` at ``length`` tokens; deterministic in ``(task, length, index, seed)``."""
    check_task(task)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise KVBoundError(f"RULER length must be a whole number of tokens >= 1, got {length!r}")
    rng = random.Random(f"ruler/{seed}/{task}/{length}/{index}")
    if task in NIAH_TASKS:
        build, upper, refs = _niah(tokenizer, task, length, rng)
    elif task == "vt":
        build, upper, refs = _vt(tokenizer, length, rng)
    elif task == "cwe":
        build, upper, refs = _cwe(tokenizer, length, rng)
    else:
        build, upper, refs = _fwe(tokenizer, length, rng)
    ctx, q = _fit(build, length, task, upper)
    if task == "fwe" and not _fwe_ranked(ctx, tokenizer, refs):
        raise KVBoundError(f"RULER task fwe at {length} tokens is too short for a Zipf ranking of its coded words")
    return RulerSample(task, length, index, tuple(ctx), tuple(q), refs, ANSWER_TOKENS[task])


def _fwe_ranked(ctx: list[int], tokenizer, refs: tuple[str, ...]) -> bool:
    """True when the three answers are strictly more frequent than every other coded word."""
    words = tokenizer.decode(ctx).split()
    counts = {w: words.count(w) for w in set(words) if w.isalpha() and len(w) == 6}
    if any(r not in counts for r in refs):
        return False
    floor = min(counts[r] for r in refs)
    return all(c < floor for w, c in counts.items() if w not in refs)


def make_samples(tokenizer, tasks: list[str], length: int, per_task: int, seed: int = 0,
                 first: int = 0) -> list[RulerSample]:
    """``per_task`` samples of each task (indices ``first`` .. ``first + per_task - 1``), in task order.

    Each sample depends only on its index, so a board can be extended by later runs and merged."""
    for task in tasks:
        check_task(task)
    return [make_sample(tokenizer, t, length, i, seed) for t in tasks for i in range(first, first + per_task)]
