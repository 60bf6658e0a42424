"""The HTTP side: FastAPI endpoints in OpenAI's shapes, SSE streaming, errors as ``{"error": {...}}``.

Each generation request is tokenized and checked here, then handed to the model worker as a job;
the worker's events come back through an asyncio queue. A client that disconnects (while its job
waits, runs, or streams) cancels the job, and the worker stops generating for it.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .affinity import affinity
from .config import ServeConfig
from .engine import Engine, failure_to_api_error
from .sampling import SamplingParams
from .schemas import APIError, ChatRequest, CompletionRequest, Reply, parse, usage
from .worker import Done, Event, Failed, Job, QueueFull, Token, WorkerStopped

POLL_S = 0.25  # how often a waiting request checks whether its client is still there


class _ClientGone(Exception):
    pass


def create_app(config: ServeConfig, model=None, tokenizer=None) -> FastAPI:
    """A FastAPI app serving ``config.model``; the model worker starts and stops with the app."""
    engine = Engine(config, model, tokenizer)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="kvbound serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.worker.alive:
            raise APIError(503, "the model worker is not running", type="server_error", code="service_unavailable")
        return JSONResponse(await run_in_threadpool(engine.health))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "kvbound"}]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json(request)
        key = affinity(body, request.headers).conversation
        req: ChatRequest = parse(ChatRequest, body)
        engine.check_model(req.model)
        prompt = await run_in_threadpool(engine.encode_chat, req.messages)
        params = engine.sampling(req, len(prompt))
        return await _generate(engine, request, prompt, params, Reply("chat", engine.name), req.stream,
                               key,
                               req.stream_options is not None and req.stream_options.include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        key = affinity(body, request.headers).conversation
        req: CompletionRequest = parse(CompletionRequest, body)
        engine.check_model(req.model)
        prompt = await run_in_threadpool(engine.encode_prompt, req.single_prompt())
        params = engine.sampling(req, len(prompt))
        return await _generate(engine, request, prompt, params, Reply("completion", engine.name), req.stream,
                               key,
                               req.stream_options is not None and req.stream_options.include_usage)

    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None


async def _generate(engine: Engine, request: Request, prompt: list[int], params: SamplingParams, reply: Reply,
                    stream: bool, key: str | None, include_usage: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            job.cancel()

    job = Job(prompt, params, emit, key=key)
    try:
        engine.worker.submit(job)
    except QueueFull as exc:
        raise APIError(429, str(exc), type="requests", code="rate_limit_exceeded") from None
    except WorkerStopped as exc:
        raise APIError(503, str(exc), type="server_error", code="service_unavailable") from None

    try:
        first = await _next(events, request, job)
        if not stream:
            return _whole(reply, first, await _collect(events, request, job, first))
    except _ClientGone:
        return JSONResponse({}, status_code=499)  # nobody reads it
    if isinstance(first, Failed):
        raise failure_to_api_error(first.error)
    if isinstance(first, Done) and first.finish_reason == "cancelled":
        raise _shutting_down()
    return StreamingResponse(_sse(reply, first, events, job, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _next(events: asyncio.Queue, request: Request, job: Job) -> Event:
    """The job's next event; cancels the job if the client disconnects while waiting."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise _ClientGone from None


async def _collect(events: asyncio.Queue, request: Request, job: Job, event: Event) -> list[Event]:
    got = [event]
    while not isinstance(event, (Done, Failed)):
        event = await _next(events, request, job)
        got.append(event)
    return got


def _whole(reply: Reply, first: Event, got: list[Event]) -> JSONResponse:
    end = got[-1]
    if isinstance(end, Failed):
        raise failure_to_api_error(end.error)
    if end.finish_reason == "cancelled":
        raise _shutting_down()
    text = "".join(e.text for e in got if isinstance(e, Token)) + end.text
    body = reply.response(text, end.finish_reason, usage(end.prompt_tokens, end.completion_tokens), end.info)
    return JSONResponse(body)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; the request was not run", type="server_error",
                    code="service_unavailable")


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(reply: Reply, first: Event, events: asyncio.Queue, job: Job, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk (chat), text chunks, a chunk with ``finish_reason``, usage, ``[DONE]``.
    If the client goes away, Starlette cancels this generator and ``finally`` cancels the job."""
    try:
        if reply.kind == "chat":
            yield _data(reply.chunk(role=True))
        event = first
        while True:
            if isinstance(event, Token):
                if event.text:
                    yield _data(reply.chunk(event.text))
            elif isinstance(event, Failed):
                yield _data(failure_to_api_error(event.error).body())
                break
            else:
                if event.text:
                    yield _data(reply.chunk(event.text))
                if event.finish_reason == "cancelled":
                    yield _data(_shutting_down().body())
                    break
                yield _data(reply.chunk(finish=event.finish_reason))
                if include_usage:
                    yield _data(reply.usage_chunk(usage(event.prompt_tokens, event.completion_tokens)))
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
