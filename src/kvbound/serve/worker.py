"""The model worker: one thread runs every model call, jobs wait in a bounded queue.

A job is one request's prompt tokens and sampling parameters. Up to ``max_batch`` jobs are active
at once (continuous batching): each cycle of the worker's loop

1. admits waiting jobs (their conversations checked out of the store) while there is room,
2. ends the jobs whose client went away (the conversation keeps the tokens generated so far),
3. runs one forward pass (:func:`kvbound.batching.packed_step`) over the next prompt pieces of
   the jobs still prefilling (oldest job first, each starting at its prompt's first unseen token,
   until one piece's worth of tokens is in) and the next decode step of every other job, and
   samples a token for each job that finished its prompt or decoded. A piece is ``prefill_chunk``
   tokens when no job decodes, and ``interleave_chunk`` tokens while some do -- so a new prompt
   delays the others' next token by one small piece per pass, not by a whole chunk. Pieces end at
   multiples of ``interleave_chunk`` positions, and a plain-K/V segment attends in query blocks cut
   there too (:func:`kvbound.batching.query_blocks`), so a prompt computes the same bits whatever
   the load cuts it into. A policy that cannot share a
   pass (:func:`kvbound.batching.batch_refusal`) prefills its prompts, then decodes, one job at a time.

Each token goes out through the job's ``emit`` callback (called on the worker thread). A job that
raises (sampling, detokenizing, its own cache) fails alone; a batched forward pass that raises
fails the jobs in that batch (their caches may be half-updated, so their conversations are dropped).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..batching import ROW_GROUP, packed_step, padded_rows
from ..generation import prefill
from ..rss import returned_transients
from .detok import TextStream
from .sampling import SamplingParams, next_token
from .store import ConversationStore, Lease


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


@dataclass(eq=False)
class _Slot:
    """An active job: its conversation lease, reply so far, and the token its next step feeds."""

    job: Job
    lease: Lease
    started: float
    stream: TextStream
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    next_input: int | None = None  # None: the prompt is still being prefilled
    first_token_s: float | None = None

    @property
    def cache(self):
        return self.lease.conversation.cache


class ModelWorker:
    """Runs every model call on one thread; ``lock`` is held while a cycle runs model calls.

    ``batched`` is ``None`` when the policy's conversations share forward passes, else why not."""

    def __init__(self, model, store: ConversationStore, decode: Callable[[Sequence[int]], str],
                 max_queue: int, prefill_chunk: int | None, max_batch: int = 8, row_group: int = ROW_GROUP,
                 sequential_reason: str | None = None, interleave_chunk: int | None = None) -> None:
        self.model = model
        self.store = store
        self.decode = decode
        self.prefill_chunk = prefill_chunk
        self.interleave_chunk = interleave_chunk
        self.max_batch = max_batch
        self.row_group = row_group
        self.sequential_reason = sequential_reason
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()
        self.eos = _eos_ids(model)
        self.active: list[_Slot] = []
        self.counters = {"requests_served": 0, "requests_cancelled": 0, "requests_failed": 0,
                         "prompt_tokens": 0, "prefilled_tokens": 0, "completion_tokens": 0,
                         "decode_passes": 0, "decode_rows": 0, "padding_rows": 0, "prefill_passes": 0}
        self._thread = threading.Thread(target=self._loop, name="kvbound-model-worker", daemon=True)
        self._stopping = False

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

    def batching(self) -> dict:
        """How decode steps run (for ``/stats``)."""
        passes = self.counters["decode_passes"]
        return {"mode": "sequential" if self.sequential_reason else "batched",
                "sequential_reason": self.sequential_reason, "max_batch": self.max_batch,
                "row_group": self.row_group, "interleave_chunk": self.interleave_chunk, "active": len(self.active),
                "mean_decode_rows": round(self.counters["decode_rows"] / passes, 3) if passes else None}

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
        while not self._stopping:
            self._admit()
            with self.lock:
                try:
                    self._cycle()
                except Exception as exc:  # noqa: BLE001 -- a bug outside any one job: fail the active ones
                    for slot in list(self.active):
                        self._fail(slot, exc)
        for slot in list(self.active):  # shutting down
            self._finish(slot, "cancelled")

    def _admit(self) -> None:
        """Take waiting jobs while fewer than ``max_batch`` are active (wait for one when none is)."""
        while len(self.active) < self.max_batch:
            try:
                job = self.jobs.get() if not self.active else self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._stopping = True
                return
            if job.cancelled.is_set():
                self.counters["requests_cancelled"] += 1
                job.emit(Done("cancelled", len(job.prompt), 0, "", {}))
                continue
            try:
                lease = self.store.checkout(job.prompt, job.key)
            except Exception as exc:  # noqa: BLE001 -- reported to the client; the worker keeps serving
                self.counters["requests_failed"] += 1
                job.emit(Failed(exc))
                continue
            params = job.params
            self.active.append(_Slot(job, lease, time.perf_counter(), TextStream(self.decode, params.stop),
                                     params.generator()))

    def _cycle(self) -> None:
        for slot in list(self.active):
            if slot.job.cancelled.is_set():
                self._finish(slot, "cancelled")
        if self.sequential_reason is None:
            self._packed()
            return
        self._prefill()
        for slot in [s for s in self.active if s.next_input is not None]:
            self._decode(slot)

    def _piece_limit(self) -> int | None:
        """Prompt tokens per pass: ``interleave_chunk`` while some job decodes, else ``prefill_chunk``."""
        if self.interleave_chunk is None or not any(s.next_input is not None for s in self.active):
            return self.prefill_chunk
        return self.interleave_chunk if self.prefill_chunk is None else min(self.prefill_chunk, self.interleave_chunk)

    def _piece_end(self, seen: int, limit: int) -> int:
        """Where a piece of at most ``limit`` tokens from position ``seen`` ends: at a multiple of
        ``interleave_chunk`` when one is that far (the query blocks' cuts)."""
        end = seen + limit
        if self.interleave_chunk:
            aligned = end - end % self.interleave_chunk
            end = aligned if aligned > seen else end
        return end

    def _packed(self) -> None:
        """One forward pass for the cycle: prompt pieces (oldest job first, until a piece's worth of
        tokens is in: :meth:`_piece_limit`) and the next decode step of every other job
        (:func:`kvbound.batching.packed_step`). A prompt's last piece ends with its last token, whose
        logits give the job's first reply token in the same pass."""
        slots, segments, fed = [], [], 0
        limit = self._piece_limit()
        for slot in [s for s in self.active if s.next_input is None]:
            if limit is not None and fed >= limit:
                break
            prompt, seen = slot.job.prompt, slot.cache.get_seq_length()
            upto = len(prompt) if limit is None else min(len(prompt), self._piece_end(seen, limit))
            slots.append(slot)
            segments.append(prompt[seen:upto])
            fed += upto - seen
        chunks = len(slots)
        for slot in [s for s in self.active if s.next_input is not None]:
            slots.append(slot)
            segments.append([slot.next_input])
        if not slots:
            return
        try:
            with returned_transients() if chunks else contextlib.nullcontext():
                logits = packed_step(self.model, [s.cache for s in slots], segments, self.row_group,
                                     self.interleave_chunk)
        except Exception as exc:  # noqa: BLE001 -- the pass failed: its caches may be half-updated
            for slot in slots:
                self._fail(slot, exc)
            return
        tokens = sum(len(seg) for seg in segments)
        self.counters["padding_rows"] += padded_rows(tokens, self.row_group) - tokens
        if chunks:
            self.counters["prefill_passes"] += 1
        if len(slots) > chunks:
            self.counters["decode_passes"] += 1
            self.counters["decode_rows"] += len(slots) - chunks
        for i, (slot, row) in enumerate(zip(slots, logits)):
            if i < chunks and slot.cache.get_seq_length() < len(slot.job.prompt):
                continue  # more of the prompt to come
            try:
                self._take(slot, row)
            except Exception as exc:  # noqa: BLE001 -- this job fails alone
                self._fail(slot, exc)

    def _prefill(self) -> None:
        """Whole prefill chunks, oldest job first, until a chunk's worth of tokens went in this cycle."""
        fed = 0
        for slot in [s for s in self.active if s.next_input is None]:
            while slot.next_input is None and (self.prefill_chunk is None or fed < self.prefill_chunk):
                try:
                    fed += self._prefill_chunk(slot)
                except Exception as exc:  # noqa: BLE001 -- this job fails alone
                    self._fail(slot, exc)
                    break

    def _prefill_chunk(self, slot: _Slot) -> int:
        """Feed ``slot``'s next prompt chunk (all but the last prompt token, which its first decode
        step feeds); returns the tokens fed."""
        prompt, cache = slot.job.prompt, slot.cache
        seen, end = cache.get_seq_length(), len(prompt) - 1
        upto = end if self.prefill_chunk is None else min(end, seen + self.prefill_chunk)
        if upto > seen:
            prefill(self.model, torch.tensor([prompt[:upto]], dtype=torch.long), cache, self.prefill_chunk)
            self.counters["prefill_passes"] += 1
        if cache.get_seq_length() >= end:
            slot.next_input = prompt[-1]
        return max(upto - seen, 1)

    def _decode(self, slot: _Slot) -> None:
        """One decode step of one job whose policy runs sequentially, then its next token."""
        try:
            logits = self._step(torch.tensor([[slot.next_input]]), slot.cache)
        except Exception as exc:  # noqa: BLE001 -- the pass failed: its cache may be half-updated
            self._fail(slot, exc)
            return
        self.counters["decode_passes"] += 1
        self.counters["decode_rows"] += 1
        try:
            self._take(slot, logits)
        except Exception as exc:  # noqa: BLE001 -- this job fails alone
            self._fail(slot, exc)

    def _take(self, slot: _Slot, logits: torch.Tensor) -> None:
        params = slot.job.params
        token = next_token(logits, params, slot.generator)
        slot.generated.append(token)
        text = slot.stream.push(token)
        if slot.first_token_s is None:
            slot.first_token_s = time.perf_counter() - slot.started
        slot.next_input = token
        slot.job.emit(Token(token, text))
        if token in self.eos or slot.stream.stopped:
            self._finish(slot, "stop")
        elif len(slot.generated) >= params.max_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, finish: str) -> None:
        """Store the conversation (its cache has seen the prompt and all reply tokens but the last)."""
        self.active.remove(slot)
        job, lease, generated = slot.job, slot.lease, slot.generated
        conv = lease.conversation
        self.store.checkin(conv, job.prompt, generated)
        key = "requests_cancelled" if finish == "cancelled" else "requests_served"
        self.counters[key] += 1
        self.counters["prompt_tokens"] += len(job.prompt)
        self.counters["prefilled_tokens"] += len(job.prompt) - lease.reused
        self.counters["completion_tokens"] += len(generated)
        info = {"conversation": conv.id, "matched": lease.matched, "restored": lease.restored,
                "reused_tokens": lease.reused, "queue_s": round(slot.started - job.submitted, 6),
                "first_token_s": None if slot.first_token_s is None else round(slot.first_token_s, 6),
                "total_s": round(time.perf_counter() - slot.started, 6)}
        job.emit(Done(finish, len(job.prompt), len(generated), slot.stream.flush(), info))

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        """The job failed: forget its conversation (its cache may be half-updated), tell its client."""
        if slot in self.active:
            self.active.remove(slot)
        self.store.discard(slot.lease.conversation)
        self.counters["requests_failed"] += 1
        slot.job.emit(Failed(exc))

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
