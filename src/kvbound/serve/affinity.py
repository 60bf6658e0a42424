"""Which conversation a request belongs to, without a tokenizer: the affinity rule of ``kvbound serve``.

Two keys come out of one request (its JSON body and its headers):

- the **routing key** sends every request of a conversation to the replica that holds its hot cache
  (:mod:`.cluster`): the ``X-Session-Id`` header if the client sends one, else the OpenAI ``user``
  field, else a hash of the conversation's first turns;
- the **conversation key** names the conversation's entry in the shared parking store
  (:mod:`.redis_store`): the ``X-Session-Id`` header, else the hash of the first turns (with the
  ``user`` field mixed in, so that two users' identical openings stay apart). The ``user`` field alone
  names a user, not a conversation, so it never names a store entry.

"The first turns" are what OpenAI's stateless API resends unchanged with every request of a chat:
the system/developer messages before the first user message, and that user message. For
``/v1/completions`` it is the first :data:`PROMPT_PREFIX_CHARS` characters of a text prompt or the
first :data:`PROMPT_PREFIX_IDS` ids of a token prompt (a continued completion repeats its prompt).
Two conversations with the same opening share a key: they go to one replica (which is good for its
prefix reuse) and overwrite each other's store entry, which is only ever used after a check that it
is a prefix of the request (:meth:`.redis_store.RedisParking.restore`), so nothing is ever answered
wrongly; send ``X-Session-Id`` to keep them apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .schemas import APIError

SESSION_HEADER = "x-session-id"
MAX_SESSION_ID = 128  # characters of X-Session-Id
PROMPT_PREFIX_CHARS = 256
PROMPT_PREFIX_IDS = 64


@dataclass(frozen=True)
class Affinity:
    """The routing key (which replica) and the conversation key (which store entry) of one request."""

    route: str
    conversation: str


def session_id(headers: Mapping[str, str] | None) -> str | None:
    """The ``X-Session-Id`` header, checked: 1..128 printable ASCII characters, else HTTP 400."""
    if not headers:
        return None
    value = None
    for name, v in headers.items():
        if name.lower() == SESSION_HEADER:
            value = v
            break
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise APIError(400, "the X-Session-Id header must be printable ASCII", param="X-Session-Id",
                           code="invalid_session_id") from None
    if not value or len(value) > MAX_SESSION_ID:
        raise APIError(400, f"the X-Session-Id header must be 1..{MAX_SESSION_ID} characters, got {len(value)}",
                       param="X-Session-Id", code="invalid_session_id")
    if not all(" " <= ch <= "~" for ch in value):
        raise APIError(400, "the X-Session-Id header must be printable ASCII", param="X-Session-Id",
                       code="invalid_session_id")
    return value


def first_turns(body: Any) -> Any:
    """What every request of this conversation repeats: the opening messages, or the prompt's start."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        opening = []
        for m in messages:
            if not isinstance(m, dict):
                break
            opening.append([m.get("role"), m.get("content")])
            if m.get("role") == "user":
                break
        return ["chat", opening]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one, as CompletionRequest.single_prompt() reads it
    if isinstance(prompt, str):
        return ["text", prompt[:PROMPT_PREFIX_CHARS]]
    if isinstance(prompt, list):
        return ["ids", prompt[:PROMPT_PREFIX_IDS]]
    return None


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def affinity(body: Any, headers: Mapping[str, str] | None = None) -> Affinity:
    """The keys of a request (raises :class:`~.schemas.APIError` 400 for a bad ``X-Session-Id``)."""
    session = session_id(headers)
    user = body.get("user") if isinstance(body, dict) else None
    user = user if isinstance(user, str) and user else None
    opening = "h:" + _digest([user, first_turns(body)])
    if session is not None:
        return Affinity("s:" + session, "s:" + session)
    if user is not None:
        return Affinity("u:" + _digest(user), opening)
    return Affinity(opening, opening)
