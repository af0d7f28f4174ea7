"""The HTTP routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`.

A chat completion goes: API key (401) -> admission, before anything is read or decoded (503 with
Retry-After when the server is full, loading or shutting down) -> the body, read up to its limit
(413) -> validation (400) -> the image, decoded in a worker thread (400 / 403 / 413) -> the engine
(400 when the prompt does not fit) -> the answer, whole or as server-sent events.

Whatever happens, a request leaves the engine: a client that goes away mid-answer cancels its
request (the streaming response is cancelled by Starlette on disconnect; a plain request races
its result against the disconnect), and every exit path calls `cancel()`, a no-op once the
request has finished. Every error is OpenAI's error body with a one-line message; a bug gives a
500 whose message names the exception type, with the traceback in the server's log only.

    >>> app = build_app(ServeConfig(model="exports/pg-224"))  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pgexport.engine import PromptTooLong, QueueFull
from pgexport.engine import Request as EngineRequest
from pgexport.errors import PgExportError
from pgexport.serve.auth import RequireApiKey
from pgexport.serve.config import ServeConfig
from pgexport.serve.host import RETRY_AFTER, ModelHost
from pgexport.serve.media import load_image_url
from pgexport.serve.metrics import CONTENT_TYPE, CountErrors, Metrics
from pgexport.serve.protocol import (
    ApiError, ChatRequest, chunk_body, completion_body, completion_id, detections_field, error_body,
    parse_chat_request, sse, usage_chunk_body,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


class EngineStream(StreamingResponse):
    """Server-sent events of one engine request; however the response ends (finished, client
    gone, server shutting down), the request is cancelled, which frees its row if it still holds one."""

    def __init__(self, handle: EngineRequest, content):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing one over `limit` bytes (413) before reading it when its length
    is declared, and as soon as it passes the limit otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over this server's limit of {limit} "
                       "(--max-image-mb); send a smaller image", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes (--max-image-mb); "
                           "send a smaller image", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({' '.join(str(e).split())[:100]})",
                       code="invalid_json") from None


async def disconnected(receive) -> None:
    """Returns when the client closes the connection (after the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def build_app(config: ServeConfig, host: ModelHost | None = None) -> Starlette:
    """The server's ASGI app for `config` (its model loads at startup; `app.state.host` holds it)."""
    host = host or ModelHost(config)
    metrics = Metrics(host.load_figures)
    name = config.served_name

    def submit(chat: ChatRequest):
        """In a worker thread: decode the image and hand it to the engine. Returns (image size, handle)."""
        image = load_image_url(chat.image_url, config.allowed_media_path, config.max_image_bytes,
                               config.max_image_pixels)
        try:
            handle = host.engine.submit(image, chat.prompt, chat.max_tokens, chat.sampling, chat.stop, chat.ignore_eos)
        except QueueFull as e:
            raise ApiError(503, f"{e}", code="queue_full", headers=RETRY_AFTER) from None
        except PgExportError as e:
            if host.draining:
                raise ApiError(503, "the server is shutting down and takes no new requests", code="shutting_down",
                               headers=RETRY_AFTER) from None
            # max_tokens was checked already: a prompt that does not fit, or one the processor cannot take.
            code = "context_length_exceeded" if isinstance(e, PromptTooLong) else "invalid_value"
            raise ApiError(400, str(e), "messages[0].content", code) from None
        return image.size, handle

    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        engine = host.admit()
        try:
            chat = parse_chat_request(await read_json(request, config.max_body_bytes),
                                      min(config.max_new_tokens, engine.max_new_tokens))
            if chat.model is not None and chat.model != name:
                raise ApiError(404, f"the model {chat.model!r} is not served here; this server serves {name!r} "
                               "(GET /v1/models)", "model", "model_not_found")
            size, handle = await run_in_threadpool(submit, chat)
        except BaseException:
            host.release()
            raise
        host.track(handle, lambda h: metrics.finished(h, arrived))
        if chat.stream:
            return EngineStream(handle, events(handle, chat, size))
        result_task = asyncio.ensure_future(handle.aresult())
        gone_task = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({result_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()  # the client left (or the server is stopping): free the row
            for task in (result_task, gone_task):
                task.cancel()
        if not result_task.done() or result_task.cancelled():
            return Response(status_code=499)  # nobody reads it
        result = result_task.result()
        if result.finish_reason == "error":
            raise ApiError(500, f"generation failed: {result.error}", code="engine_error")
        if result.finish_reason == "cancelled":
            raise ApiError(503, "the server is shutting down; the request was cancelled", code="shutting_down")
        detections = detections_field(result.text, *size) if chat.is_detection else None
        return JSONResponse(completion_body(completion_id(), name, result.text, result.finish_reason,
                                            result.prompt_tokens, result.completion_tokens, detections))

    async def events(handle: EngineRequest, chat: ChatRequest, size: tuple[int, int]):
        cid, created = completion_id(), int(time.time())

        def chunk(delta, finish_reason=None):
            return sse(chunk_body(cid, created, name, delta, finish_reason, chat.include_usage))

        started = False
        async for piece in handle.astream():
            if not started:  # the role comes with the first token, as OpenAI's and vLLM's streams
                started = True
                yield chunk({"role": "assistant", "content": ""})
            if piece.text:
                yield chunk({"content": piece.text})
        result = await handle.aresult()
        if result.finish_reason in ("error", "cancelled"):
            status = 500 if result.finish_reason == "error" else 503
            metrics.error(status)  # the response itself went out as 200
            message = (f"generation failed: {result.error}" if status == 500
                       else "the server is shutting down; the request was cancelled")
            yield sse(error_body(status, message, code="engine_error" if status == 500 else "shutting_down"))
            yield sse("[DONE]")
            return
        if not started:
            yield chunk({"role": "assistant", "content": ""})
        delta = {"detections": detections_field(result.text, *size)} if chat.is_detection else {}
        yield chunk(delta, result.finish_reason)
        if chat.include_usage:
            yield sse(usage_chunk_body(cid, created, name, result.prompt_tokens, result.completion_tokens))
        yield sse("[DONE]")

    async def models(request: Request) -> Response:
        card = {"id": name, "object": "model", "created": host.created, "owned_by": "pgexport"}
        if host.engine is not None:
            card["max_model_len"] = host.engine.max_len
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        state = host.state
        body = {"status": state, **({"error": host.error} if host.error else {})}
        return JSONResponse(body, 200 if state == "ready" else 503)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}; the API is POST /v1/chat/completions and "
                        "GET /v1/models, plus GET /health and GET /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        metrics.error(500)  # answered outside CountErrors, by Starlette's outermost layer
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                                       code="internal_error"), 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        host.start(background=config.load_in_background)
        try:
            yield
        finally:
            await run_in_threadpool(host.close)

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_route, methods=["GET"])],
        middleware=[Middleware(CountErrors, metrics=metrics), Middleware(RequireApiKey, key=config.api_key)],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan)
    app.state.host = host
    app.state.metrics = metrics
    return app
