"""The server's state without HTTP: model, tokenizer, conversation store and model worker.

:class:`Engine` turns a validated request into prompt token ids and :class:`SamplingParams`
(raising :class:`~.schemas.APIError` for what the model cannot do) and reports ``/stats``.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from .. import make_cache
from ..batching import batch_refusal
from ..errors import KVBoundError
from ..generation import max_positions
from ..rss import current_rss_bytes, peak_rss_bytes
from .config import ServeConfig
from .sampling import SamplingParams
from .schemas import APIError, ChatMessage, ChatRequest, CompletionRequest
from .store import ConversationStore
from .worker import ModelWorker


class Engine:
    """One model served under one cache policy."""

    def __init__(self, config: ServeConfig, model=None, tokenizer=None) -> None:
        if model is None:
            from ..models import load

            model, tokenizer = load(config.model)
        self.config = config
        self.model, self.tokenizer = model, tokenizer
        self.name = config.model
        self.created = int(time.time())
        probe = make_cache(model, config.policy, config.budget, **config.options)  # bad policy/options: fail now
        sequential = batch_refusal(probe)
        probe.close()
        cfg = model.config.get_text_config(decoder=True)
        self.max_positions: int | None = max_positions(model)
        self.vocab_size: int = cfg.vocab_size
        self._tok_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads
        self.store = ConversationStore(self.new_cache, config.memory_budget, config.max_conversations,
                                       shared=self._shared_store())
        self.worker = ModelWorker(model, self.store, self.decode, config.max_queue, config.prefill_chunk,
                                  config.max_batch, config.row_group, sequential, config.interleave_chunk)

    def _shared_store(self):
        """The shared parking store of ``config.store`` (fails fast, one line, if it cannot be reached)."""
        if self.config.store is None:
            return None
        from .redis_store import connect_store

        return connect_store(self.config.store, self.name, vocab_size=self.vocab_size, ttl_s=self.config.store_ttl)

    def health(self) -> dict:
        """``/health``: ``ok``, or ``degraded`` when the shared store is down (hot conversations still serve)."""
        shared = self.store.shared
        if shared is None:
            return {"status": "ok"}
        up = shared.up or shared.ping()
        return {"status": "ok" if up else "degraded", "store": shared.kind, "store_up": up,
                "store_error": None if up else shared.last_error}

    def new_cache(self):
        c = self.config
        return make_cache(self.model, c.policy, c.budget, **c.options)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()

    # -- tokens ------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.name!r} has no chat template; use /v1/completions", code="no_chat_template")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            with self._tok_lock:
                out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
        except Exception as exc:  # noqa: BLE001 -- a template rejects the messages (e.g. role order)
            raise APIError(400, f"the chat template refused these messages: {str(exc).splitlines()[0]}",
                           param="messages") from None
        return list(out["input_ids"])

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            with self._tok_lock:
                ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = list(prompt)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in 0..{self.vocab_size - 1}", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    # -- checks -----------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           code="model_not_found", param="model")

    def sampling(self, req: ChatRequest | CompletionRequest, prompt_tokens: int) -> SamplingParams:
        """Sampling parameters for a prompt of ``prompt_tokens``; refuses what the model's positions cannot hold."""
        req.check_unsupported()
        limit = self.max_positions
        room = None if limit is None else limit - prompt_tokens
        if room is not None and room < 1:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens but model {self.name!r} handles at most "
                                f"{limit} positions (including at least one reply token)",
                           code="context_length_exceeded", param="messages" if isinstance(req, ChatRequest) else "prompt")
        wanted = req.token_limit()
        if wanted is not None and wanted < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {wanted}", param="max_tokens", code="invalid_value")
        if wanted is not None and room is not None and wanted > room:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) + max_tokens {wanted} exceeds model "
                                f"{self.name!r}'s {limit} positions; ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        if wanted is None and room is None:
            raise APIError(400, "max_tokens is required for this model (no known position limit)", param="max_tokens")
        return SamplingParams(
            max_tokens=wanted if wanted is not None else room,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stops(),
        )

    def stats(self) -> dict:
        c = self.config
        return {
            "model": self.name, "policy": c.policy, "budget": c.budget,
            **self.store.stats(), **self.worker.counters,
            "queued": self.worker.queued(), "max_queue": c.max_queue, "batching": self.worker.batching(),
            "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes(),
        }


def failure_to_api_error(exc: BaseException) -> APIError:
    """What a failed job tells its client: bad input (``KVBoundError``) is a 400, anything else a 500."""
    if isinstance(exc, KVBoundError):
        return APIError(400, str(exc).splitlines()[0])
    return APIError(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    type="server_error")
