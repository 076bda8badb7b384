"""OpenAI-compatible HTTP ingress: validates requests, routes by `model` to that model's replicas.

Client mistakes are answered with OpenAI-style error bodies (400/401/404), never a 500. A replica
whose engine died answers 503; the ingress retries such a request on another replica while no
output has reached the client yet, so only requests already streaming from the dead engine fail.

A model has one deployment per packing variant (`LLM:<model>@n<N>`). The routes (which variants
take requests, how many replicas each runs, their batch) come from the status board, refreshed
every `ROUTE_REFRESH_S`; each request goes to the accepting variant with the most free capacity
(running replicas x batch, minus what this ingress already has in flight there). A draining
variant gets no new requests, which is what lets the policy stop it without failing any.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.openai_api import (
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    usage_chunk_body,
    validation_error_body,
)
from cluster.board import AppPlacement, get_or_create_board
from cluster.policy import Route
from deployments.protocol import GenerateChunk, GenerateError, GenerateRequest, GenerateResult, StreamItem

logger = logging.getLogger("ray.serve")
ROUTE_REFRESH_S = 0.5
app = FastAPI(title="plateau-serve", docs_url=None, redoc_url=None)


class ServedModel(BaseModel):
    """A model the ingress routes to (shown by GET /v1/models)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    max_model_len: Optional[int]
    replicas: int


class RetryPolicy(BaseModel):
    """How often a request that found a dead replica is tried again before answering 503."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    attempts: int = Field(6, ge=1, description="Tries in total, the first one included.")
    backoff_s: float = Field(0.5, ge=0.0, description="Wait before the 2nd try; doubles, capped at 4 s.")


def _unavailable(detail: str) -> GenerateError:
    return GenerateError(status=503, type="service_unavailable", message=detail, retryable=True)


def _error(status: int, message: str, type_: str, param: Optional[str] = None, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code if code is not None else status), status_code=status)


def choose_variant(routes: list[Route], inflight: dict[int, int]) -> Optional[int]:
    """The accepting variant with the most free capacity (running replicas x batch minus this
    ingress's requests in flight there). A variant with no running replica, or one that drains,
    only when nothing else can take the request: the request then waits there instead of failing."""
    live = [r for r in routes if r.accepting and r.running > 0]
    pool = live or [r for r in routes if r.running > 0] or [r for r in routes if r.accepting] or routes
    if not pool:
        return None
    best = max(pool, key=lambda r: (max(1, r.running) * r.max_num_seqs - inflight.get(r.n, 0), -r.n))
    return best.n


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # constructed outside Serve
        return ""


# Serve pickles the ingress class with the FastAPI app when this decorator runs: helpers the
# routes call must already exist above this line.
@serve.ingress(app)
class OpenAIIngress:
    def __init__(
        self,
        handles: dict[str, dict[int, DeploymentHandle]],
        models: list[ServedModel],
        api_key: Optional[str],
        retry: RetryPolicy,
        placement: AppPlacement,
    ):
        self.handles = handles
        self.models = {m.name: m for m in models}
        self.api_key = api_key
        self.retry = retry
        self.routes: dict[str, list[Route]] = dict(placement.routes)
        self.inflight: dict[tuple[str, int], int] = {}
        self._board = None
        self._refresher: Optional[asyncio.Task] = None
        self.app_name = _app_name()
        try:
            self._board = get_or_create_board()
            self._board.set_placement.remote(placement.model_copy(update={"app": self.app_name}))
        except Exception as exc:  # routing still works from the build-time routes
            logger.warning("no status board (%s): routing by the start placement only", exc)

    # ---- variant choice -------------------------------------------------------------------
    def _choose(self, model: str) -> tuple[int, DeploymentHandle]:
        self._ensure_refresher()
        by_n = self.handles[model]
        routes = [r for r in self.routes.get(model, []) if r.n in by_n]
        inflight = {r.n: self.inflight.get((model, r.n), 0) for r in routes}
        n = choose_variant(routes, inflight)
        n = n if n is not None else next(iter(by_n))
        return n, by_n[n]

    def _ensure_refresher(self) -> None:
        if self._board is not None and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_routes())

    async def _refresh_routes(self) -> None:
        while True:
            try:
                routes = await self._board.routes.remote(self.app_name)
                if routes:
                    self.routes = {m: rs for m, rs in routes.items() if m in self.handles}
            except Exception as exc:  # board restarting: keep the last routes
                logger.debug("route refresh failed: %s", exc)
            await asyncio.sleep(ROUTE_REFRESH_S)

    def _track(self, model: str, n: int, delta: int) -> None:
        key = (model, n)
        self.inflight[key] = self.inflight.get(key, 0) + delta

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "plateau-serve",
                 "max_model_len": m.max_model_len, "replicas": self._replicas(m)} for m in self.models.values()]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatRequest, chat=True)

    # ---- request path ---------------------------------------------------------------------
    async def _serve(self, request: Request, schema: type, chat: bool) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(payload, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        try:
            body = schema.model_validate(payload)
        except ValidationError as exc:
            return JSONResponse(validation_error_body(exc), status_code=400)
        if body.model not in self.handles:
            known = ", ".join(sorted(self.handles))
            return _error(404, f"model {body.model!r} does not exist; served models: {known}",
                          "invalid_request_error", param="model", code="model_not_found")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            gen = body.to_generate(rid)
        except (ValueError, ValidationError) as exc:
            return _error(400, str(exc), "invalid_request_error", param="prompt")
        if body.stream:
            return await self._stream(body.model, gen, body, chat)
        outcome = await self._call(body.model, gen)
        if isinstance(outcome, GenerateError):
            return _error(outcome.status, outcome.message, outcome.type, outcome.param)
        return JSONResponse(completion_body(rid, body.model, outcome, chat))

    def _replicas(self, m: ServedModel) -> int:
        routes = self.routes.get(m.name)
        return sum(r.running for r in routes) if routes else m.replicas

    async def _call(self, model: str, gen: GenerateRequest) -> Union[GenerateResult, GenerateError]:
        outcome: Union[GenerateResult, GenerateError] = _unavailable("no replica answered")
        for attempt in range(self.retry.attempts):
            req = gen.model_copy(update={"request_id": f"{gen.request_id}-{attempt}"})
            n, handle = self._choose(model)
            self._track(model, n, 1)
            try:
                outcome = await handle.generate.remote(req)
            except (RayActorError, ActorUnavailableError) as exc:
                outcome = _unavailable(f"replica unavailable ({type(exc).__name__}); retry the request")
            finally:
                self._track(model, n, -1)
            if not (isinstance(outcome, GenerateError) and outcome.retryable):
                return outcome
            await self._backoff(attempt)
        return outcome

    async def _open_stream(self, model: str, gen: GenerateRequest):
        """Start a stream and read its first item, retrying while nothing was produced yet.
        Returns (first item, stream, variant); the variant stays counted in flight until `_sse` ends."""
        first: StreamItem = _unavailable("no replica answered")
        for attempt in range(self.retry.attempts):
            req = gen.model_copy(update={"request_id": f"{gen.request_id}-{attempt}"})
            n, handle = self._choose(model)
            self._track(model, n, 1)
            stream = handle.options(stream=True).generate_stream.remote(req)
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                return None, stream, n
            except (RayActorError, ActorUnavailableError) as exc:
                first = _unavailable(f"replica unavailable ({type(exc).__name__}); retry the request")
            if not (isinstance(first, GenerateError) and first.retryable):
                return first, stream, n
            self._track(model, n, -1)
            stream.cancel()
            await self._backoff(attempt)
        return first, None, None

    async def _stream(self, model: str, gen: GenerateRequest, body, chat: bool) -> Response:
        first, stream, n = await self._open_stream(model, gen)
        if isinstance(first, GenerateError):
            if stream is not None:
                stream.cancel()
            if n is not None:
                self._track(model, n, -1)
            return _error(first.status, first.message, first.type, first.param)
        return StreamingResponse(
            self._sse(first, stream, gen.request_id, body.model, chat, body.include_usage, n),
            media_type="text/event-stream",
        )

    async def _sse(self, first, stream, rid: str, model: str, chat: bool, include_usage: bool,
                   variant: int) -> AsyncIterator[str]:
        try:
            async for line in self._sse_lines(first, stream, rid, model, chat, include_usage):
                yield line
        finally:
            self._track(model, variant, -1)

    async def _sse_lines(self, first, stream, rid: str, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        seen: set[int] = set()
        completion: dict[int, int] = {}
        prompt_tokens = 0

        def render(chunk: GenerateChunk) -> str:
            nonlocal prompt_tokens
            prompt_tokens = chunk.prompt_tokens
            completion[chunk.index] = chunk.completion_tokens
            is_first = chunk.index not in seen
            seen.add(chunk.index)
            return "data: " + json.dumps(chunk_body(rid, model, chunk, chat, is_first)) + "\n\n"

        try:
            if first is not None:
                yield render(first)
                async for item in stream:
                    if isinstance(item, GenerateError):
                        yield "data: " + json.dumps(error_body(item.message, item.type, item.param, item.status)) + "\n\n"
                        break
                    yield render(item)
        except (RayActorError, ActorUnavailableError) as exc:
            err = error_body(f"replica failed mid-stream ({type(exc).__name__})", "service_unavailable", code=503)
            yield "data: " + json.dumps(err) + "\n\n"
        if include_usage:
            yield "data: " + json.dumps(usage_chunk_body(rid, model, prompt_tokens, sum(completion.values()), chat)) + "\n\n"
        yield "data: [DONE]\n\n"

    async def _backoff(self, attempt: int) -> None:
        if attempt + 1 < self.retry.attempts:
            await asyncio.sleep(min(4.0, self.retry.backoff_s * (2 ** attempt)))

    def _auth(self, request: Request) -> Optional[Response]:
        if not self.api_key:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not token:
            return _error(401, "missing API key: send `Authorization: Bearer <key>`", "authentication_error")
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return _error(401, "invalid API key", "authentication_error")
        return None
