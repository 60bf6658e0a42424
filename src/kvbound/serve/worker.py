"""The model worker: one thread runs every model call, jobs wait in a bounded queue.

A job is one request's prompt tokens and sampling parameters. The worker checks the conversation
out of the store, prefills the prompt tokens the cache has not seen (chunked,
:func:`kvbound.generation.prefill`), samples up to ``max_tokens`` tokens and reports each one
through the job's ``emit`` callback (called on the worker thread). A cancelled job (its client
went away) stops before its next model call and its conversation keeps the tokens generated so far.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..generation import prefill
from .detok import TextStream
from .sampling import SamplingParams, next_token
from .store import ConversationStore


class QueueFull(Exception):
    """The bounded queue has no room: the request is refused (HTTP 429)."""


class WorkerStopped(Exception):
    """The worker is not running (shutting down or failed): HTTP 503."""


@dataclass(frozen=True)
class Token:
    """One generated token and the text it makes final (may be empty while a character is incomplete)."""

    id: int
    text: str


@dataclass(frozen=True)
class Done:
    """The job finished: why (``stop``, ``length`` or ``cancelled``), token counts and timing."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str  # the remaining text not yet carried by a Token event
    info: dict


@dataclass(frozen=True)
class Failed:
    """The job raised: the exception."""

    error: BaseException


Event = Token | Done | Failed


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    key: str | None = None  # the conversation's key in the shared parking store (affinity.py)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    """Serializes model calls on one thread; ``lock`` is held while a job runs."""

    def __init__(self, model, store: ConversationStore, decode: Callable[[Sequence[int]], str],
                 max_queue: int, prefill_chunk: int | None) -> None:
        self.model = model
        self.store = store
        self.decode = decode
        self.prefill_chunk = prefill_chunk
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()
        self.eos = _eos_ids(model)
        self.counters = {"requests_served": 0, "requests_cancelled": 0, "requests_failed": 0,
                         "prompt_tokens": 0, "prefilled_tokens": 0, "completion_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="kvbound-model-worker", daemon=True)
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            while True:  # wake the loop: the queue may be full of jobs, which get cancelled
                try:
                    self.jobs.put(None, timeout=0.1)
                    break
                except queue.Full:
                    self._cancel_waiting()
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise WorkerStopped("the model worker is not running")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"server busy: {self.jobs.maxsize} requests are already waiting for the model") from None

    def queued(self) -> int:
        return self.jobs.qsize()

    def _cancel_waiting(self) -> None:
        try:
            job = self.jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            job.cancel()
            job.emit(Done("cancelled", len(job.prompt), 0, "", {}))

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.counters["requests_cancelled"] += 1
                job.emit(Done("cancelled", len(job.prompt), 0, "", {}))
                continue
            with self.lock:
                try:
                    self._run(job)
                except Exception as exc:  # noqa: BLE001 -- reported to the client; the worker keeps serving
                    self.counters["requests_failed"] += 1
                    job.emit(Failed(exc))

    @torch.no_grad()
    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        lease = self.store.checkout(job.prompt, job.key)
        conv, cache = lease.conversation, lease.conversation.cache
        params = job.params
        stream = TextStream(self.decode, params.stop)
        generated: list[int] = []
        finish = "length"
        first_token_s = None
        try:
            ids = torch.tensor([job.prompt], dtype=torch.long)
            prefill(self.model, ids[:, :-1], cache, self.prefill_chunk)
            logits = self._step(ids[:, -1:], cache)
            generator = params.generator()
            while len(generated) < params.max_tokens:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                token = next_token(logits, params, generator)
                generated.append(token)
                text = stream.push(token)
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                job.emit(Token(token, text))
                if token in self.eos or stream.stopped:
                    finish = "stop"
                    break
                if len(generated) < params.max_tokens:
                    logits = self._step(torch.tensor([[token]]), cache)
        except BaseException:
            self.store.discard(conv)
            raise
        self.store.checkin(conv, job.prompt, generated)
        key = "requests_cancelled" if finish == "cancelled" else "requests_served"
        self.counters[key] += 1
        self.counters["prompt_tokens"] += len(job.prompt)
        self.counters["prefilled_tokens"] += len(job.prompt) - lease.reused
        self.counters["completion_tokens"] += len(generated)
        info = {"conversation": conv.id, "matched": lease.matched, "restored": lease.restored,
                "reused_tokens": lease.reused, "queue_s": round(started - job.submitted, 6),
                "first_token_s": None if first_token_s is None else round(first_token_s, 6),
                "total_s": round(time.perf_counter() - started, 6)}
        job.emit(Done(finish, len(job.prompt), len(generated), stream.flush(), info))

    def _step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """One forward pass on ``ids`` after what ``cache`` holds; the last position's logits."""
        seen = cache.get_seq_length()
        out = self.model(input_ids=ids, attention_mask=torch.ones(1, seen + ids.shape[1], dtype=torch.long),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
