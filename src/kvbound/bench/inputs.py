"""What the bench feeds the model: prompts, chat messages, budgets, and conversations.

Built-in data lives in ``kvbound/data/``: ``prompts/*.txt`` (long original English passages;
``prompts/answers.json`` maps a prompt name to a needle answer the continuation should contain)
and ``multiturn.json`` (the user messages of the multi-turn scenario).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import KVBoundError
from ..prompts import read_prompt_file

ANSWERS_FILE = "answers.json"


def data_dir() -> Path:
    return Path(str(resources.files("kvbound") / "data"))


@dataclass(frozen=True)
class Prompt:
    """One long input text; ``answer`` is a needle the continuation should mention (or ``None``)."""

    name: str
    text: str
    answer: str | None = None


def _answers(folder: Path) -> dict[str, str]:
    path = folder / ANSWERS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise KVBoundError(f"{path} is not valid JSON ({exc}); expected {{\"prompt name\": \"answer\"}}") from None
    return {str(k): str(v) for k, v in data.items()}


def _read(path: Path) -> str:
    return read_prompt_file(path).rstrip("\n")


def load_prompts(files: list[str] | None = None, directory: str | None = None) -> list[Prompt]:
    """Prompts from ``files``, else every ``*.txt`` in ``directory``, else the built-in set."""
    if files and directory:
        raise KVBoundError("use either --prompt-file or --prompts-dir, not both")
    if files:
        paths = [Path(f).expanduser() for f in files]
    else:
        folder = Path(directory).expanduser() if directory else data_dir() / "prompts"
        if not folder.is_dir():
            raise KVBoundError(f"prompts directory {folder} does not exist")
        paths = sorted(folder.glob("*.txt"))
        if not paths:
            raise KVBoundError(f"prompts directory {folder} has no *.txt files")
    prompts = []
    for path in paths:
        text = _read(path)
        prompts.append(Prompt(path.stem, text, _answers(path.parent).get(path.stem)))
    names = [p.name for p in prompts]
    if len(set(names)) != len(names):
        raise KVBoundError(f"prompt names must be unique (file stems), got {names}")
    return prompts


def load_messages() -> list[str]:
    """The built-in user messages for the multi-turn scenario."""
    return [str(m) for m in json.loads((data_dir() / "multiturn.json").read_text(encoding="utf-8"))]


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """A budget as given: whole tokens, or a fraction of the prompt's length."""

    value: float
    is_fraction: bool

    @property
    def label(self) -> str:
        return f"{self.value:g}" if self.is_fraction else str(int(self.value))

    def tokens(self, context: int) -> int:
        """Tokens kept per layer for a prompt of ``context`` tokens."""
        return max(1, round(self.value * context)) if self.is_fraction else int(self.value)


def parse_budgets(text: str) -> list[Budget]:
    """``"32,128"`` (tokens) or ``"0.25,0.5"`` (fractions of the prompt length, in (0, 1])."""
    out: list[Budget] = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise KVBoundError(f"budget {item!r} is not a number; use tokens (32,128) or fractions in (0,1] (0.25,0.5)") from None
        if item.lstrip("+").isdigit():
            if value < 1:
                raise KVBoundError(f"budget {item!r} must be >= 1 token, or a fraction in (0,1]")
            out.append(Budget(value, False))
        elif 0 < value <= 1:
            out.append(Budget(value, True))
        else:
            raise KVBoundError(f"budget fraction {item!r} is outside (0,1]; use a fraction in (0,1] or a whole number of tokens")
    if not out:
        raise KVBoundError("no budgets given; use tokens (32,128) or fractions in (0,1] (0.25,0.5)")
    if len({b.is_fraction for b in out}) > 1:
        raise KVBoundError(f"budgets {text!r} mix tokens and fractions; use one kind")
    return out


# --------------------------------------------------------------------------- chat


_SENTINEL = "KVBOUNDREPLYSENTINEL"


class Conversation:
    """Token ids of a chat that only ever grows, so one cache can follow it across turns.

    Each turn appends the policy's own reply tokens (as generated, never re-tokenized) and then
    the chat template's text between that reply and the next assistant turn.
    """

    def __init__(self, tokenizer, device: torch.device | str = "cpu", eos: int | list[int] | None = None) -> None:
        self.tok = tokenizer
        self.device = device
        self.messages: list[dict[str, str]] = []
        self.ids: list[int] = []
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])

    def _template(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except (ValueError, AttributeError) as exc:
            raise KVBoundError(f"the tokenizer has no usable chat template for the multiturn scenario: {exc}") from None

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def add_user(self, text: str) -> torch.Tensor:
        """Append a user message and the assistant prompt; return the whole conversation's ids."""
        user = {"role": "user", "content": text}
        if not self.messages:
            self.ids = self._encode(self._template([user], True))
        else:
            rendered = self._template([*self.messages[:-1], {"role": "assistant", "content": _SENTINEL}, user], True)
            if rendered.count(_SENTINEL) != 1:
                raise KVBoundError("the chat template does not render assistant replies verbatim; cannot follow the chat")
            self.ids += self._encode(rendered.split(_SENTINEL, 1)[1])
        self.messages.append(user)
        return torch.tensor([self.ids], device=self.device)

    def add_reply(self, reply_ids: list[int]) -> str:
        """Append the assistant's generated ids (a trailing end-of-turn token is left to the template)."""
        kept = reply_ids[:-1] if reply_ids and reply_ids[-1] in self.eos else list(reply_ids)
        self.ids += kept
        text = self.tok.decode(kept)
        self.messages.append({"role": "assistant", "content": text})
        return text


# --------------------------------------------------------------------------- long haystack


def _body_and_question(text: str) -> tuple[str, str]:
    """A built-in prompt split into its passage and its closing ``Question: ... Answer: ...``."""
    at = text.rfind("\n\nQuestion:")
    return (text, "") if at < 0 else (text[:at].strip(), text[at:])


def haystack_ids(tokenizer, tokens: int, needle: str = "lighthouse") -> tuple[torch.Tensor, str | None]:
    """A prompt of exactly ``tokens`` token ids built from the bundled passages: the passages (the
    ``needle`` one first, so its fact sits at the far end of the context) repeated as numbered
    parts until long enough, cut, then the ``needle`` prompt's question. Returns ``(ids [1, tokens],
    expected answer or None)``."""
    prompts = {p.name: p for p in load_prompts()}
    if needle not in prompts:
        raise KVBoundError(f"no built-in prompt named {needle!r}; valid: {', '.join(prompts)}")
    bodies = [_body_and_question(prompts[needle].text)[0]]
    bodies += [_body_and_question(p.text)[0] for name, p in prompts.items() if name != needle]
    question = _body_and_question(prompts[needle].text)[1] or "\n\nQuestion: What was this text about?\nAnswer:"
    tail = tokenizer(question, add_special_tokens=False)["input_ids"]
    if tokens <= len(tail):
        raise KVBoundError(f"a long prompt needs more than {len(tail)} tokens, got {tokens}")
    parts: list[str] = []
    body: list[int] = []
    while len(body) < tokens - len(tail):
        parts.append(f"Part {len(parts) + 1}.\n{bodies[len(parts) % len(bodies)]}")
        body = tokenizer("\n\n".join(parts))["input_ids"]
    ids = body[: tokens - len(tail)] + tail
    return torch.tensor([ids], dtype=torch.long), prompts[needle].answer
