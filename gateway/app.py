"""The REST facade: OpenAI-compatible routes over the ChatQnA pipeline and the services.

Routes validate with the pydantic models of :mod:`gateway.schemas`, translate with
:mod:`gateway.translate`, call the pipeline or a service, and write JSON with orjson. Every
error is OpenAI-shaped (:mod:`gateway.errors`). A client that goes away cancels its request,
down to the gRPC calls in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import sys
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import errors, schemas, translate
from gateway.auth import KeyRing, route_scope
from gateway.errors import HTTPError
from gateway.ingestion import Knowledge
from gateway.limits import Capacity, Limiter
from gateway.megaservice import ChatQnA
from gateway.mesh import Mesh
from gateway.metrics import Metrics
from opea_grpc import logs, telemetry
from opea_grpc.cache import bypass
from opea_grpc.errors import NodeError, ServiceError
from opea_grpc.pb.v1 import chatqna_pb2, common_pb2
from opea_grpc.run import StreamRun

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

T = TypeVar("T")

_JSON = "application/json"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"
#: Paths a full gateway still answers: probes must not fail because the gateway is busy.
_PROBES = frozenset({"/healthz", "/readyz", "/v1/health_check", "/metrics"})
#: Where a request's model tokens are left for the rate limiter (in the ASGI scope's state).
USAGE = "opea_usage_tokens"


class JSONBytes(Response):
    """``content`` as orjson's bytes, ``application/json``. Its headers are built as bytes at
    once (starlette's own constructor re-reads them as strings: on every answer, that adds up).
    """

    media_type = _JSON

    def __init__(self, content: object, headers: dict[str, str] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.body = body = orjson.dumps(content)
        self.raw_headers = [(b"content-length", b"%d" % len(body)), (b"content-type", _JSON_BYTES)]
        if headers:
            self.raw_headers += [
                (k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()
            ]


_JSON_BYTES = _JSON.encode()
_json = JSONBytes


def _error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Invalid request: malformed JSON, a field out of range, nothing to work on",
        404: "Unknown model, collection or route",
        413: "Request body larger than the gateway accepts",
        429: "A service is over capacity; retry after `retry-after` seconds",
        499: "The client closed the connection",
        500: "Internal error",
        503: "A service the request needs is unavailable; retry after `retry-after` seconds",
        504: "The request's deadline expired",
    }
    return {
        code: {"model": schemas.ErrorResponse, "description": described[code]}
        for code in (*statuses, 400, 413, 500)
    }


#: One server-sent event: ``data`` is a chat.completion.chunk's JSON, an error's, or [DONE].
_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
_PIPELINE_ERRORS = _error_docs(404, 429, 499, 503, 504)


def _answers(description: str) -> dict[int | str, dict[str, Any]]:
    """The documented responses of a pipeline route: JSON or an event stream, and errors."""
    ok = {"description": description, "content": {"text/event-stream": {"schema": _EVENT}}}
    return {**_PIPELINE_ERRORS, 200: ok}


_SERVICE_ERRORS = _error_docs(404, 429, 503, 504)


@dataclass(frozen=True)
class Gateway:
    """What the routes need; built and started by :mod:`gateway.service`."""

    mesh: Mesh
    pipeline: ChatQnA
    knowledge: Knowledge
    metrics: Metrics


def _uncancel(task: asyncio.Task[Any]) -> None:
    """Take back a cancellation this module made (so the task is not cancelled any more)."""
    if sys.version_info >= (3, 11):
        task.uncancel()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _until_disconnect(receive: Receive, task: asyncio.Task[Any], gone: list[bool]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.append(True)
    task.cancel()


#: Seconds a request runs before its client's connection is watched. A disconnect before then
#: is still seen (the watcher's first read reports it at once), only later: most requests end
#: sooner and pay no watcher task at all.
WATCH_AFTER = 0.25


async def guarded(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise :class:`ClientGone`."""
    task = asyncio.current_task()
    assert task is not None
    gone: list[bool] = []
    watcher: list[asyncio.Task[None]] = []

    def watch() -> None:
        watcher.append(asyncio.create_task(_until_disconnect(request.receive, task, gone)))

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        _uncancel(task)
        raise ClientGone from None
    finally:
        timer.cancel()
        if watcher:
            watcher[0].cancel()


class EventStream(Response):
    """A ``text/event-stream`` response that stops its producer when the client disconnects."""

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(status_code=200)
        self.frames = frames
        self.raw = _SSE_HEADERS + [(k.encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw})
        task = asyncio.current_task()
        assert task is not None
        gone: list[bool] = []
        watcher = asyncio.create_task(_until_disconnect(receive, task, gone))
        try:
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            _uncancel(task)
        except OSError:  # the client went away while a frame was being written
            pass
        finally:
            watcher.cancel()
            close = getattr(self.frames, "aclose", None)
            if close is not None:
                await close()


def _frame(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def _request_id() -> bytes:
    """A request id unique to this process run: a random prefix and a counter (no syscall)."""
    return f"{_ID_PREFIX}{next(_ids):016x}".encode()


_access = logging.getLogger("gateway.access")


class _Span:
    """The server span of one REST request, current while the request runs (tracing on).

    Its parent is the caller's W3C ``traceparent`` header when there is one; every pipeline node
    and gRPC call the request makes is beneath it.
    """

    def __init__(self, tracer: Tracer, scope: Scope, request_id: str) -> None:
        from opentelemetry import context, propagate, trace

        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        self.method = method = scope["method"]
        path = scope["path"]
        self.span = tracer.start_span(
            f"{method} {path}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "opea.request_id": request_id,
            },
        )
        self._token = context.attach(trace.set_span_in_context(self.span))

    def end(self, route: str | None, status: int) -> None:
        from opentelemetry import context, trace

        span = self.span
        if route:
            span.set_attribute("http.route", route)
            span.update_name(f"{self.method} {route}")
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {status}"))
        span.end()
        context.detach(self._token)


class _Guard:
    """Outermost ASGI layer: body size limit (413), request id, keys and rate limits, in-flight
    gauge, request metrics, the request's trace span and access log line."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body: int,
        direct: dict[tuple[str, str], ASGIApp] | None = None,
        keys: KeyRing | None = None,
        metrics_closed: bool = False,
        limiter: Limiter | None = None,
        access_log: bool = False,
        capacity: Capacity | None = None,
    ) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.capacity = capacity
        self.direct = direct or {}
        self.keys, self.metrics_closed, self.limiter = keys, metrics_closed, limiter
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = None
        request_id = b""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await self._too_large(send)
                return
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-request-id" and 0 < len(value) <= 128 and value.isascii():
                request_id = value
        # Every answer carries the caller's request id, or one made here for the logs to share.
        request_id = request_id or _request_id()
        rid = scope.setdefault("state", {})["request_id"] = request_id.decode()
        capacity = self.capacity
        if capacity is not None and scope["path"] not in _PROBES and capacity.full():
            await self._refuse(send, capacity.refusal(), request_id)  # shed before any work
            return
        who = ""
        if self.keys is not None or self.limiter is not None:
            guarded, needed = route_scope(
                scope["method"], scope["path"], metrics_closed=self.metrics_closed
            )
            try:
                if guarded and self.keys is not None:
                    who = self.keys.check(authorization, needed).name
                elif guarded:
                    who = (scope.get("client") or ("unknown",))[0]
                if who and self.limiter is not None:
                    self.limiter.admit(who)
            except ServiceError as denied:
                await self._refuse(send, denied, request_id)
                return
        started = time.perf_counter()
        status = [500]
        seen = [0]
        refused = [False]
        max_body = self.max_body

        async def limited() -> Message:
            if refused[0]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > max_body:  # answer 413 now; the app sees the client leave
                    refused[0] = True
                    status[0] = 413
                    await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def sending(message: Message) -> None:
            if refused[0]:
                return
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        route = scope["path"] if scope["path"] in self.metrics.routes else "other"
        gauge = self.metrics.in_flight_of(route)
        app = self.direct.get((scope["method"], scope["path"]), self.app)
        traced = telemetry.tracer is not None and scope["path"] not in _PROBES
        gauge.inc()
        if capacity is not None:
            capacity.enter()
        logged = logs.request_id.set(rid)
        span = None
        try:
            if traced:
                span = _Span(typing.cast("Tracer", telemetry.tracer), scope, rid)
            await app(scope, limited, sending)
        finally:
            gauge.dec()
            if capacity is not None:
                capacity.leave()
            matched = getattr(scope.get("route"), "path", None)
            try:
                if who and self.limiter is not None:
                    self.limiter.charge(who, scope.get("state", {}).get(USAGE, 0))
                label = matched or (route if route != "other" else "unmatched")
                seconds = time.perf_counter() - started
                self.metrics.finished(label, status[0], seconds)
                if self.access_log:
                    _access.info(
                        '%s %s %d %.1fms "%s"', scope["method"], scope["path"], status[0],
                        seconds * 1000, (scope.get("client") or ("-",))[0],
                    )  # fmt: skip
            finally:  # the span's context and the request id come off whatever happens
                if span is not None:
                    span.end(matched, status[0])
                logs.request_id.reset(logged)

    def _message(self) -> str:
        return f"the request body exceeds {self.max_body} bytes (OPEA_GATEWAY_MAX_BODY_BYTES)"

    async def _refuse(self, send: Send, refused: ServiceError, request_id: bytes) -> None:
        unauthenticated = refused.code is grpc.StatusCode.UNAUTHENTICATED
        status, kind, code = {
            grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
            grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "insufficient_scope"),
        }.get(refused.code, (429, "rate_limit_error", "rate_limit_exceeded"))
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id)]
        if unauthenticated:
            headers.append((b"www-authenticate", b'Bearer realm="opea-grpc"'))
        for name, value in refused.trailing_metadata:
            if name == "retry-after":
                headers.append((b"retry-after", str(value).encode()))
        self.metrics.finished("refused", status, 0.0)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": errors.body(refused.message, kind, code=code)}
        )

    async def _too_large(self, send: Send) -> None:
        content = errors.body(self._message(), "invalid_request_error", code="request_too_large")
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    problems = exc.errors()
    if not problems:
        return "the request is invalid", None
    first = problems[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    param = ".".join(loc)
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{param}: {first.get('msg', 'invalid')}{more}", param


def problem(exc: Exception) -> Response:
    """The OpenAI-shaped error response for anything a route raised."""
    if isinstance(exc, RequestValidationError | ValidationError):
        message, param = _validation_message(exc)
        return errors.response(400, errors.body(message, "invalid_request_error", param=param))
    if isinstance(exc, ClientGone):
        return errors.response(499, errors.body("the client closed the connection", "cancelled"))
    return errors.of_exception(exc)


def _direct(endpoint: Callable[[Request], Awaitable[Response]], path: str) -> ASGIApp:
    """``endpoint`` as an ASGI app of its own, errors included: the hottest route runs outside
    the framework's middleware and routing (about 0.05 ms of CPU per request)."""
    route = Route(path, endpoint, methods=["POST"])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:  # every error becomes its OpenAI-shaped response
            response = problem(exc)
        await response(scope, receive, send)

    return app


def create_app(
    gw: Gateway,
    *,
    keys: KeyRing | None = None,
    metrics_closed: bool = False,
    limiter: Limiter | None = None,
    access_log: bool = False,
    capacity: Capacity | None = None,
) -> ASGIApp:
    """The ASGI application of the gateway's REST facade (API keys checked when ``keys``;
    requests beyond ``capacity`` refused with 429)."""
    settings = gw.pipeline.settings
    app = FastAPI(
        title="opea-grpc gateway",
        version="0.1.0",
        description="OpenAI-compatible REST facade over the opea-grpc ChatQnA pipeline.",
    )

    def deadline(asked: float | None) -> float:
        return min(asked if asked is not None else settings.timeout, settings.max_timeout)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    @app.exception_handler(HTTPError)
    @app.exception_handler(ServiceError)
    @app.exception_handler(NodeError)
    @app.exception_handler(grpc.aio.AioRpcError)
    @app.exception_handler(ClientGone)
    async def on_known(request: Request, exc: Exception) -> Response:
        return problem(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error"
        )
        message = (
            f"no route {request.method} {request.url.path}"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        reply = errors.response(exc.status_code, errors.body(message, kind))
        reply.headers.update(exc.headers or {})
        return reply

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        return errors.of_exception(exc)

    async def check_model(model_id: str, kind: common_pb2.ModelKind.ValueType) -> None:
        try:
            await gw.mesh.model(model_id, kind)
        except ServiceError as exc:
            if exc.code is not grpc.StatusCode.NOT_FOUND:
                raise
            raise HTTPError(404, exc.message, param="model", code="model_not_found") from None

    # -- chat ------------------------------------------------------------------------------------

    async def answer(
        request: Request,
        ask: chatqna_pb2.AskRequest,
        *,
        stream: bool,
        include_usage: bool,
        timeout: float,
        use_cache: bool,
    ) -> Response | EventStream:
        started = time.perf_counter()
        token = bypass.set(not use_cache)
        try:
            if not stream:
                result = await guarded(request, gw.pipeline.ask(ask, timeout=timeout))
                request.scope.setdefault("state", {})[USAGE] = result.response.usage.total_tokens
                timing = translate.server_timing(result.timings, time.perf_counter() - started)
                return _json(translate.completion(result), {"server-timing": timing})
            run = gw.pipeline.ask_stream(ask, timeout=timeout)
            try:
                first = await guarded(request, run.__anext__())
            except BaseException:
                await run.aclose()
                raise
        finally:
            bypass.reset(token)
        gw.metrics.first_token.observe(time.perf_counter() - started)
        timing = translate.server_timing(run.timings)
        state = request.scope.setdefault("state", {})
        return EventStream(_frames(run, first, include_usage, state), {"server-timing": timing})

    async def _frames(
        run: StreamRun[Any], first: Any, include_usage: bool, state: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        try:
            head = translate.chunk(first, include_usage)
            report = {
                "sources": translate.sources(run.state.sources),
                "degraded": run.degraded,
            }
            if head is None:
                head = {"choices": [], "opea": report}
            else:
                head["opea"] = report
            yield _frame(head)
            async for piece in run:
                if piece.HasField("usage"):
                    state[USAGE] = piece.usage.total_tokens
                payload = translate.chunk(piece, include_usage)
                if payload is not None:
                    yield _frame(payload)
        except Exception as exc:  # after the first byte only an error event can say so
            yield b"data: " + errors.event(exc) + b"\n\n"
            return
        finally:
            await run.aclose()
        yield _DONE

    @app.post(
        "/v1/chat/completions",
        response_model=schemas.ChatCompletion,
        responses=_answers(
            "A chat.completion, or with stream=true an event stream of chat.completion.chunk"
            " frames ending with `data: [DONE]`"
        ),
        summary="Answer with the RAG pipeline (OpenAI chat completions)",
    )
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        await check_model(body.model, common_pb2.MODEL_KIND_CHAT)
        rag = body.opea
        return await answer(
            request,
            translate.ask_request(body),
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            timeout=deadline(rag.timeout if rag else None),
            use_cache=rag.cache if rag else True,
        )

    @app.post(
        "/v1/chatqna",
        response_model=schemas.ChatCompletion,
        responses=_answers(
            "OPEA's ChatQnA request, answered as an OpenAI chat completion (streamed unless"
            " stream=false, as OPEA does)"
        ),
        summary="OPEA ChatQnA-compatible entry point",
    )
    async def chatqna(body: schemas.ChatQnARequest, request: Request) -> Any:
        if body.model:
            model = body.model
            await check_model(model, common_pb2.MODEL_KIND_CHAT)
        else:
            chats = [m for m in await gw.mesh.models() if m.kind == common_pb2.MODEL_KIND_CHAT]
            model = chats[0].id if chats else ""
        return await answer(
            request,
            translate.chatqna_request(body, model),
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            timeout=deadline(None),
            use_cache=True,
        )

    # -- services ----------------------------------------------------------------------------

    @app.post(
        "/v1/embeddings",
        response_model=schemas.EmbeddingList,
        responses=_SERVICE_ERRORS,
        summary="Embed text (OpenAI embeddings)",
    )
    async def embeddings(body: schemas.EmbeddingRequest, request: Request) -> Any:
        from opea_grpc.pb.v1 import embedding_pb2

        await check_model(body.model, common_pb2.MODEL_KIND_EMBEDDING)
        texts = translate.embedding_input(body.input)
        embed = embedding_pb2.EmbedRequest(input=texts, user=body.user or "")
        if body.dimensions is not None:
            embed.dimensions = body.dimensions
        reply = await guarded(
            request, gw.pipeline.downstreams.embedding.embed(embed, timeout=deadline(None))
        )
        return _json(translate.embeddings(reply, body.encoding_format))

    async def rerank(body: schemas.RerankRequest, request: Request) -> Any:
        client = gw.pipeline.downstreams.rerank
        if client is None:
            raise HTTPError(
                404, "this gateway runs without a rerank service", type="not_found_error"
            )
        if body.model:
            await check_model(body.model, common_pb2.MODEL_KIND_RERANK)
        req = translate.rerank_request(body)
        reply = await guarded(request, client.rerank(req, timeout=deadline(None)))
        return _json(translate.reranked(reply, req, body.return_documents))

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.post(
            path,
            response_model=schemas.RerankResponse,
            responses=_SERVICE_ERRORS,
            summary="Rerank documents for a query (Cohere/Jina shape, as vLLM and TEI serve)",
            include_in_schema=path == "/v1/rerank",
        )(rerank)

    @app.get("/v1/models", response_model=schemas.ModelList, responses=_error_docs(503))
    async def list_models() -> Any:
        return _json({"object": "list", "data": translate.model_cards(await gw.mesh.models())})

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=schemas.ModelCard,
        responses=_error_docs(404, 503),
    )
    async def get_model(model_id: str) -> Any:
        for m in await gw.mesh.models(fresh=True):
            if m.id == model_id:
                return _json(translate.model_cards([m])[0])
        raise HTTPError(
            404,
            f"The model {model_id!r} does not exist",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    # -- knowledge base ----------------------------------------------------------------------

    @app.post(
        "/v1/ingest",
        response_model=schemas.IngestResponse,
        responses=_SERVICE_ERRORS,
        summary="Chunk, embed and store documents",
    )
    async def ingest(body: schemas.IngestRequest, request: Request) -> Any:
        work = gw.knowledge.ingest(body, timeout=settings.max_timeout)
        return _json(await guarded(request, work))

    @app.post(
        "/v1/search",
        response_model=schemas.SearchResponse,
        responses=_SERVICE_ERRORS,
        summary="Search a collection (hybrid dense + BM25)",
    )
    async def search(body: schemas.SearchRequest, request: Request) -> Any:
        return _json(await guarded(request, gw.knowledge.search(body, timeout=deadline(None))))

    @app.post(
        "/v1/documents/delete",
        response_model=schemas.DeleteResponse,
        responses=_SERVICE_ERRORS,
        summary="Delete chunks by id, source or filter",
    )
    async def delete_documents(body: schemas.DeleteRequest, request: Request) -> Any:
        return _json(await guarded(request, gw.knowledge.delete(body, timeout=deadline(None))))

    @app.get("/v1/collections", response_model=schemas.CollectionList, responses=_SERVICE_ERRORS)
    async def collections() -> Any:
        return _json(await gw.knowledge.collections(timeout=deadline(None)))

    @app.delete("/v1/collections/{name}", status_code=204, responses=_SERVICE_ERRORS)
    async def drop_collection(name: str) -> Response:
        await gw.knowledge.drop(name, timeout=deadline(None))
        return Response(status_code=204)

    # -- operations --------------------------------------------------------------------------

    @app.get("/healthz", response_model=schemas.Status, summary="Liveness")
    async def healthz() -> Any:
        return _json({"status": "ok"})

    @app.get("/v1/health_check", response_model=schemas.Status, summary="Liveness (OPEA's path)")
    async def health_check() -> Any:
        return _json({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=schemas.Status,
        responses={503: {"model": schemas.Status, "description": "a required service is down"}},
        summary="Readiness: every service the pipeline needs is SERVING",
    )
    async def readyz() -> Any:
        ready = gw.mesh.ready()
        content = {"status": "ready" if ready else "not ready", "detail": gw.mesh.states()}
        return Response(orjson.dumps(content), status_code=200 if ready else 503, media_type=_JSON)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return Response(gw.metrics.exposition(), media_type="text/plain; version=0.0.4")

    gw.metrics.routes.update(getattr(r, "path", "") for r in app.routes)

    # The hottest route skips FastAPI's per-request machinery: the body is validated straight
    # from its bytes and errors are mapped here. The FastAPI declaration above stays for
    # /openapi.json (and answers only if this one is taken away).
    async def chat_completions_fast(request: Request) -> Response:
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone, or refused by the size limit: nobody reads this
            return Response(status_code=499)
        body = schemas.ChatCompletionRequest.model_validate_json(raw)
        return await chat_completions(body, request)

    direct = {
        ("POST", "/v1/chat/completions"): _direct(chat_completions_fast, "/v1/chat/completions")
    }
    guard = _Guard(
        app,
        gw.metrics,
        settings.max_body_bytes,
        direct,
        keys,
        metrics_closed,
        limiter,
        access_log,
        capacity=capacity,
    )
    if not settings.cors_origins:
        return guard  # closed: browsers on other origins get no CORS headers
    # Outside the guard: a browser's preflight carries no key.
    return CORSMiddleware(
        guard,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["authorization", "content-type", "x-request-id"],
        expose_headers=["x-request-id", "server-timing", "retry-after"],
    )


__all__ = ["ClientGone", "EventStream", "Gateway", "create_app", "guarded"]
