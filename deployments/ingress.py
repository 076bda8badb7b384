"""The ingress: the app's endpoints that span all models, and the Python path for requests.

With Ray's HAProxy on (`make run`), requests vLLM answers (`POST /v1/completions`,
`/v1/chat/completions`, `/tokenize`, `/detokenize`) do not come here: the router pins each to an LLM
replica's own server (`deployments/router.py`, `deployments/replica_front.py`). The ingress then
answers what HAProxy balances over the app's servers and what replicas hand over (`http`): `GET
/health`, `/version`, `/v1/models`, `/openapi.json` (vLLM's schema for these paths), 401 for a
missing or wrong key (every path but `/health`), 404 for a model it does not serve, 413 / 400 for a
body over the app's `RequestLimits` (read no further than the limit, never parsed), in vLLM's error
format, and the requests the router could not pin (no replica of the model up yet, several models
and no body to tell them apart).

Without HAProxy (a plain `serve run`), and for the Python API, every request comes here and is
forwarded, body untouched, to a replica of the model the body names, where vLLM's OpenAI app
answers it (`deployments/replica.py`: validation, error bodies, status codes and SSE are vLLM's).
A model has one deployment per packing variant (`LLM:<model>@n<N>`; `LLM:<model>_<type>@n<N>` per
device type when it runs on several). The routes (which variants take requests, how many replicas
each runs, their batch) come from the status board, refreshed every `ROUTE_REFRESH_S`; each request
goes to the accepting variant with the most free capacity (running replicas x batch, minus what
this ingress already has in flight there). A draining variant gets no new requests, which is what
lets the policy stop it without failing any. A request whose replica died, or whose engine was
dead, before anything was produced is sent to another replica (`retry`); one still waiting at a
variant that stopped taking requests is sent where the model now runs; one that waits past
`retry.first_byte_timeout_s` gets a 504. A replica or engine death while the replica had the
request counts against its body (`cluster.routing.retry_decision`, `DeathLedger`): at
`retry.max_deaths` (2: one retry) the request, and a resend of the same body, is answered 422
instead of ending one more replica. Once bytes reached the client the stream ends as vLLM ends it,
or with vLLM's error event when the replica sends nothing for `retry.idle_timeout_s`. The Python
API (`completions`, `chat` and their `_stream` forms on vLLM's request types) is routed, retried
and timed the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable, Optional

import psutil

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.background import BackgroundTask

from cluster.board import AppPlacement, ensure_routes, get_or_create_board
from cluster.policy import Route
from cluster.routing import (DeathLedger, ReplicaReport, RequestLimits, ServedModel, body_refusal, choose_variant,
                             merge_routes, model_of, request_fingerprint, retry_decision, should_reroute)
from deployments.asgi import HttpItem, HttpRequest, HttpStart
from advisor.niceness import undo_worker_niceness
from deployments.engine import EngineDead
from deployments.replica_front import key_error
from deployments.vllm_api import FORWARDED_PATHS

logger = logging.getLogger("ray.serve")
ROUTE_REFRESH_S = 0.5
_REPLICA_GONE = (RayActorError, ActorUnavailableError)
app = FastAPI(title="plateau-serve", docs_url=None, redoc_url=None, openapi_url=None)


class RetryPolicy(BaseModel):
    """How a request that found a dead replica is retried, and how long any request may wait."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    attempts: int = Field(6, ge=1, description="Tries in total, the first one included.")
    backoff_s: float = Field(0.5, ge=0.0, description="Wait before the 2nd try; doubles, capped at 4 s.")
    first_byte_timeout_s: float = Field(
        900.0, gt=0, description="Longest wait for a replica's first answer (the whole answer when not "
                                 "streaming); then 504, so no request waits forever."
    )
    max_deaths: int = Field(
        2, ge=1, description="Deaths of a replica or its engine while it had a request, after which the request "
                             "is answered 422 and sent nowhere else (its resends of the same body too, until one is "
                             "answered or for 10 minutes): 2 sends it again once. A body that crashes its engine "
                             "would otherwise end a replica per try."
    )
    idle_timeout_s: float = Field(
        120.0, gt=0, description="Longest gap between two pieces of an answer once its first byte went out; then "
                                 "the stream ends with vLLM's error event. A replica sends its first byte with the "
                                 "first output (queueing and prefill fall under first_byte_timeout_s), so the gaps "
                                 "after it are engine steps and a preempted sequence's wait for memory."
    )


def error_response(status: int, message: str, err_type: str, param: Optional[str] = None) -> JSONResponse:
    """An error in vLLM's (OpenAI's) format: {"error": {message, type, param, code}}."""
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                        status_code=status)


async def _http_request(request: Request, max_bytes: Optional[int] = None) -> HttpRequest:
    """The request with its body, or, once the body runs past `max_bytes`, what was read so far
    (longer than `max_bytes`, so it is refused): this one process reads every Python-path body, and
    reading an oversized one whole would hold it all in memory."""
    parts, size = [], 0
    async for chunk in request.stream():
        parts.append(chunk)
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            break
    return HttpRequest(method=request.method, path=request.url.path, query_string=request.url.query,
                       headers=list(request.headers.items()), body=b"".join(parts))


def _replica_actor_name() -> str:
    """This replica's Serve actor name: what HAProxy's server map and the routers call it."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # constructed outside Serve
        return ""


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # constructed outside Serve
        return ""


PROXY_ACTORS = ("ProxyActor", "HAProxyManager")  # Serve's Python proxy; the actor that runs HAProxy


def _serve_proxies_on_this_node() -> list[int]:
    """Serve's HTTP proxy actors started by the same raylet as this process, and what they run
    (the HAProxy processes of Ray's HAProxy ingress)."""
    try:
        return proxy_pids(psutil.Process().parent().children())
    except (psutil.Error, AttributeError):
        return []


def proxy_pids(siblings) -> list[int]:
    """Of a raylet's children (psutil processes), the proxy actors and every process they started."""
    found = []
    for p in siblings:
        try:
            if any(name in " ".join(p.cmdline()[:1]) or name in p.name() for name in PROXY_ACTORS):
                found += [p.pid, *(c.pid for c in p.children(recursive=True))]
        except psutil.Error:
            continue
    return found


class _Rerouted(Exception):
    """The variant a request waited at stopped taking requests before it answered."""


class _RelayIdle(Exception):
    """A replica sent nothing for `retry.idle_timeout_s` after the first byte went out."""


async def _next_chunk(stream, idle_s: Optional[float]):
    """The stream's next item (StopAsyncIteration after its last); `_RelayIdle` when none came within
    `idle_s`. (No sentinel object: Serve pickles the ingress class by value, and such an object
    would not be the same one in its methods.)"""
    try:
        async with asyncio.timeout(idle_s) as idle:
            return await anext(stream)
    except TimeoutError:
        if idle.expired():
            raise _RelayIdle from None
        raise


def _sse_error(status: int, message: str, err_type: str) -> bytes:
    """vLLM's end of a failed stream: an error event, then `data: [DONE]`."""
    err = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


def _is_sse(headers: list[tuple[str, str]]) -> bool:
    return any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)


def _python_fingerprint(request) -> str:
    """A Python API request's identity for the death ledger: its type and fields, less vLLM's
    per-object `request_id` (a resend is a new object)."""
    return request_fingerprint(type(request).__name__.encode(),
                               request.model_dump_json(exclude={"request_id"}).encode())


class _Unanswered(Exception):
    """No replica produced a first answer: the status and error type to answer with (vLLM's format)."""

    def __init__(self, status: int, message: str, err_type: str):
        super().__init__(message)
        self.status, self.err_type = status, err_type

    def as_error_response(self):
        """vLLM's `ErrorResponse`, what the Python API returns for the errors vLLM answers itself."""
        from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

        return ErrorResponse(error=ErrorInfo(message=str(self), type=self.err_type, code=self.status))


REROUTE_CHECK_S = 1.0  # how often a request waiting for its first answer checks that its variant still accepts


class _Flight:
    """One request counted in flight on a variant until `release()` (idempotent)."""

    def __init__(self, ingress: "OpenAIIngress", model: str, deployment: str):
        self._ingress, self._key, self._done = ingress, (model, deployment), False
        ingress.inflight[self._key] = ingress.inflight.get(self._key, 0) + 1

    def release(self, stream=None) -> None:
        if self._done:
            return
        self._done = True
        self._ingress.inflight[self._key] -= 1
        if stream is not None:
            stream.cancel()  # a no-op once the replica's generator has finished


class _FlightResponse(StreamingResponse):
    """A replica's answer relayed to the client, its flight released however the response ends.
    When sending the status line fails or is cancelled (the client or the proxy went away), neither
    the body iterator nor the background task ever runs: the request would stay counted in flight on
    its variant for good and every later choice would see that variant fuller than it is."""

    def __init__(self, stream, flight: _Flight, **kwargs):
        super().__init__(**kwargs)
        self._stream, self._flight = stream, flight

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._flight.release(self._stream)


# Serve pickles the ingress class with the FastAPI app when this decorator runs: helpers the
# routes call must already exist above this line.
@serve.ingress(app)
class OpenAIIngress:
    async def __init__(
        self,
        handles: dict[str, dict[str, DeploymentHandle]],
        models: list[ServedModel],
        api_key: Optional[str],
        retry: RetryPolicy,
        placement: AppPlacement,
        openapi: dict,
        engine_version: str,
        limits: RequestLimits = RequestLimits(),
    ):
        self.handles = handles  # served name -> variant deployment -> its handle
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.api_key = api_key
        self.retry = retry
        self.limits = limits
        self.openapi = openapi
        self.engine_version = engine_version
        self.routes: dict[str, list[Route]] = merge_routes(placement.routes, models)  # by served name
        self.placement = placement
        self.inflight: dict[tuple[str, str], int] = {}  # (served name, deployment) -> requests
        self.deaths = DeathLedger()  # replica and engine deaths request bodies met, across resends
        self.data_requests = 0  # requests vLLM answers that went through this process
        self.handed_over = 0  # requests LLM replicas' own servers handed over
        self._board = None
        self._refresher: Optional[asyncio.Task] = None
        self.app_name = _app_name()
        # Every streamed token passes through this process and Serve's HTTP proxy (or HAProxy, which
        # its manager actor starts and restarts on reloads): at Ray's worker niceness they would wait
        # behind the engines they relay (nice 0), and tokens would arrive in bursts, late.
        for pid in [None, *_serve_proxies_on_this_node()]:
            if (warning := undo_worker_niceness(pid)) is not None:
                logger.warning(warning)
        try:
            self._board = get_or_create_board()
            self.placement = placement.model_copy(update={"app": self.app_name})
            self._board.set_placement.remote(self.placement)
        except Exception as exc:  # routing still works from the build-time routes
            logger.warning("no status board (%s): routing by the start placement only", exc)
        self.replica_id = _replica_actor_name()
        self._ensure_refresher()  # the routers learn from the board where the Python path is

    # ---- variant choice -------------------------------------------------------------------
    def _choose(self, model: str) -> tuple[str, DeploymentHandle]:
        self._ensure_refresher()
        variants = self.handles[model]
        routes = [r for r in self.routes.get(model, []) if r.deployment in variants]
        inflight = {r.deployment: self.inflight.get((model, r.deployment), 0) for r in routes}
        deployment = choose_variant(routes, inflight) or next(iter(variants))
        return deployment, variants[deployment]

    def _ensure_refresher(self) -> None:
        if self._board is not None and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_routes())

    async def _refresh_routes(self) -> None:
        while True:
            try:
                # a restarted board that lost its state gets the placement again
                routes = await ensure_routes(self._board, self.placement)
                if routes:
                    self.routes = merge_routes(routes, list(self.models.values()))
                self._board.report_replica.remote(self.app_name, ReplicaReport(
                    replica_id=self.replica_id, role="ingress", at=time.time()))
            except Exception as exc:  # board restarting: keep the last routes
                logger.debug("route refresh failed: %s", exc)
            await asyncio.sleep(ROUTE_REFRESH_S)

    # ---- HTTP: the routes, and the requests LLM replicas hand over ---------------------------
    @app.get("/health")
    async def health_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.get("/version")
    async def version_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.get("/openapi.json")
    async def openapi_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.get("/v1/models")
    async def models_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.post("/v1/completions")
    async def completions_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.post("/v1/chat/completions")
    async def chat_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.post("/tokenize")
    async def tokenize_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    @app.post("/detokenize")
    async def detokenize_http(self, request: Request) -> Response:
        return await self._respond(await _http_request(request, self.limits.max_body_bytes))

    async def http(self, req: HttpRequest) -> AsyncIterator[HttpItem]:
        """A request an LLM replica's own server handed over (another model's, one its dead engine
        could not answer, an app-wide endpoint), answered as if it had come here: an `HttpStart`,
        then the body."""
        self.handed_over += 1
        response = await self._respond(req)
        try:
            yield HttpStart(status=response.status_code,
                            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers])
            if isinstance(response, StreamingResponse):
                async for chunk in response.body_iterator:
                    yield chunk if isinstance(chunk, bytes) else chunk.encode()
            elif response.body:
                yield response.body
        finally:
            if response.background is not None:
                await response.background()

    def path_counts(self) -> dict[str, int]:
        """Requests vLLM answers that went through this process (`data_requests`: on the direct path
        only what the router could not pin), and those LLM replicas handed over (`handed_over`)."""
        return {"data_requests": self.data_requests, "handed_over": self.handed_over}

    async def _respond(self, req: HttpRequest) -> Response:
        if req.method == "GET" and req.path == "/health":
            return self._health()
        if (denied := self._auth(req.headers)) is not None:
            return denied
        data = req.method == "POST" and req.path in FORWARDED_PATHS
        if (refused := body_refusal(req.body, self.limits, parsed=data)) is not None:
            return error_response(*refused)
        if data:
            return await self._forward(req)
        if req.method == "GET" and req.path == "/version":
            return JSONResponse({"version": self.engine_version})
        if req.method == "GET" and req.path == "/openapi.json":
            return JSONResponse(self.openapi)
        if req.method == "GET" and req.path == "/v1/models":
            return self._models()
        return error_response(404, f"{req.method} {req.path} is not served here", "NotFoundError")

    def _health(self) -> Response:
        """200 when every model has a running replica (what load balancers and benchmark clients probe)."""
        self._ensure_refresher()  # probes may come before any request: running counts are the board's
        down = [m for m in self.models if self._replicas(m) == 0]
        if down:
            return error_response(503, f"no running replica for: {', '.join(down)}", "ServiceUnavailableError")
        return Response(status_code=200)

    def _models(self) -> Response:
        self._ensure_refresher()
        data = [{"id": m.name, "object": "model", "created": int(time.time()), "owned_by": "plateau-serve",
                 "root": m.name, "parent": None, "max_model_len": m.max_model_len, "replicas": self._replicas(m.name)}
                for m in self.models.values()]
        return JSONResponse({"object": "list", "data": data})

    def _replicas(self, model: str) -> int:
        routes = self.routes.get(model)
        return sum(r.running for r in routes) if routes else self.models[model].replicas

    async def _forward(self, req: HttpRequest) -> Response:
        """A request vLLM answers, sent to a replica of the model its body names."""
        model = model_of(req.body)
        if model is not None and model not in self.handles:
            return error_response(404, f"The model `{model}` does not exist. Served models: "
                                       f"{', '.join(sorted(self.handles))}", "NotFoundError", param="model")
        self.data_requests += 1
        req = req.model_copy(update={"headers": [(k, v) for k, v in req.headers if k != "authorization"]})
        return await self._send(model or self.default_model, req)

    async def _send(self, model: str, req: HttpRequest) -> Response:
        """Open the request on a replica (`_open`), then relay it. One a replica's server handed
        over after its engine died running it (`engine_died`) starts with that death counted."""
        try:
            start, stream, flight = await self._open(
                model, lambda handle: handle.options(stream=True).http.remote(req),
                dead=lambda start: not isinstance(start, HttpStart) or start.retryable,
                fingerprint=lambda: request_fingerprint(req.path.encode(), req.body), deaths=int(req.engine_died))
        except _Unanswered as no:
            return error_response(no.status, str(no), no.err_type)
        relay = self._relay(stream, flight, self.retry.idle_timeout_s, sse=_is_sse(start.headers))
        return _FlightResponse(stream, flight, content=relay, status_code=start.status,
                               headers=dict(start.headers), background=BackgroundTask(flight.release, stream))

    async def _open(self, model: str, call: Callable[[DeploymentHandle], object],
                    dead: Callable[[object], bool] = lambda first: False, fingerprint: Callable[[], str] = lambda: "",
                    deaths: int = 0) -> tuple[object, object, "_Flight"]:
        """Send a request to the variant with the most free room and wait for its first item (the
        whole answer when `call` is not a stream), retrying while nothing was produced: when the
        replica is gone, its engine is dead (`dead(first)`, or `EngineDead` raised), or its variant
        stopped taking requests while the request waited there. A replica that died, or an engine
        that died with the request in it (`ran`; `deaths` before this call), counts against the
        request's body (`fingerprint()`, hashed only when needed): `retry_decision` says whether it
        goes on. Returns the first item, the call and its flight (the caller releases it); raises
        `_Unanswered` (503 after the last try, 504 after `first_byte_timeout_s`, 422 at
        `retry.max_deaths`)."""
        key: Optional[str] = None

        def body_key() -> str:
            nonlocal key
            if key is None:
                key = fingerprint()
            return key

        prior = self.deaths.deaths(body_key()) if len(self.deaths) else 0  # its earlier sends' deaths
        own, answered = deaths, False
        try:
            if retry_decision(prior + own, 0, self.retry.attempts, self.retry.max_deaths) == "refuse":
                raise self._refusal(model, prior + own)
            reason = "no replica answered"
            for attempt in range(self.retry.attempts):
                deployment, handle = self._choose(model)
                flight = _Flight(self, model, deployment)
                pending = call(handle)
                try:
                    first = await self._first_answer(pending, model, deployment)
                except asyncio.TimeoutError:
                    flight.release(pending)
                    raise _Unanswered(504, f"no answer from a replica of {model!r} within "
                                           f"{self.retry.first_byte_timeout_s:.0f} s", "GatewayTimeoutError") from None
                except _Rerouted:
                    flight.release(pending)
                    logger.info("request for %s waited at %s, which stopped taking requests: sent again", model,
                                deployment)
                    continue  # the variant moved: send it again at once (it counts as a try, bounding the moves)
                except _REPLICA_GONE as exc:  # it had the request: whether it ran yet, nobody can tell
                    flight.release(pending)
                    reason, ran = f"replica unavailable ({type(exc).__name__})", True
                except EngineDead as exc:
                    flight.release(pending)
                    reason, ran = "the replica's engine is dead", getattr(exc, "ran", True)
                except BaseException:
                    flight.release(pending)
                    raise
                else:
                    if not dead(first):
                        answered = True
                        return first, pending, flight
                    flight.release(pending)
                    reason, ran = "the replica's engine is dead", getattr(first, "ran", True)
                own += bool(ran)
                verdict = retry_decision(prior + own, attempt + 1, self.retry.attempts, self.retry.max_deaths)
                if verdict == "refuse":
                    raise self._refusal(model, prior + own)
                if verdict == "unavailable":
                    break
                await self._backoff(attempt)
            raise _Unanswered(503, f"{reason}; tried {self.retry.attempts} times, retry the request later",
                              "ServiceUnavailableError")
        finally:
            if answered:
                if len(self.deaths):
                    self.deaths.clear(body_key())
            elif own:
                self.deaths.settle(body_key(), prior + own)

    def _refusal(self, model: str, deaths: int) -> _Unanswered:
        """The answer to a request that was in a replica or engine as it died `deaths` times."""
        logger.error("a request for %s was in a replica or engine as it died %d times: it is answered 422 and sent "
                     "to no other replica", model, deaths)
        times = "twice" if deaths == 2 else f"{deaths} times"
        return _Unanswered(422, f"this request ended its replica's engine {times}; it is not retried again",
                           "UnprocessableEntityError")

    async def _first_answer(self, pending, model: str, deployment: str):
        """The first item of a replica's stream (or the answer of a non-streaming call); raises
        `_Rerouted` when its variant (`deployment`) stops taking requests while this one still waits in its queue,
        and asyncio.TimeoutError after `first_byte_timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry.first_byte_timeout_s
        first = asyncio.ensure_future(pending.__anext__() if hasattr(pending, "__anext__") else pending)
        while True:
            left = deadline - loop.time()
            done, _ = await asyncio.wait({first}, timeout=max(0.0, min(REROUTE_CHECK_S, left)))
            if done:
                return first.result()
            if left <= REROUTE_CHECK_S:
                first.cancel()
                raise asyncio.TimeoutError
            if should_reroute(self.routes.get(model, []), deployment):
                first.cancel()
                raise _Rerouted

    async def _relay(self, stream, flight: _Flight, idle_s: Optional[float] = None,
                     sse: bool = True) -> AsyncIterator[bytes]:
        """The rest of a replica's answer. A replica that dies, or sends nothing for `idle_s`, ends
        a stream (`sse`) the way vLLM ends a failed one; any other answer is cut off (an error)."""
        try:
            while True:
                try:
                    chunk = await _next_chunk(stream, idle_s)
                except StopAsyncIteration:
                    break
                yield chunk
        except _REPLICA_GONE as exc:  # the replica died mid-stream: end it the way vLLM ends a failed stream
            yield _sse_error(503, f"replica failed mid-stream ({type(exc).__name__})", "ServiceUnavailableError")
        except _RelayIdle:
            logger.error("a replica sent nothing for %.0f s in the middle of an answer: it is ended", idle_s)
            if not sse:
                raise
            yield _sse_error(504, f"the replica sent nothing for {idle_s:.0f} s (retry.idle_timeout_s); the stream "
                                  f"was ended", "GatewayTimeoutError")
        finally:
            flight.release(stream)

    async def _backoff(self, attempt: int) -> None:
        if attempt + 1 < self.retry.attempts:
            await asyncio.sleep(min(4.0, self.retry.backoff_s * (2 ** attempt)))

    def _auth(self, headers: list[tuple[str, str]]) -> Optional[Response]:
        denied = key_error(self.api_key, next((v for k, v in headers if k == "authorization"), ""))
        if denied is None:
            return None
        status, body = denied
        return Response(body, status_code=status, media_type="application/json")

    # ---- Python API (DeploymentHandle) ----------------------------------------------------
    async def completions(self, request):
        """A vLLM `CompletionRequest` -> `CompletionResponse` or `ErrorResponse`, routed like HTTP."""
        return await self._call(request, "completions")

    async def chat(self, request):
        """A vLLM `ChatCompletionRequest` -> `ChatCompletionResponse` or `ErrorResponse`."""
        return await self._call(request, "chat")

    async def completions_stream(self, request) -> AsyncIterator[str]:
        """`stream=True` completions: vLLM's SSE lines (`data: {...}`), ending with `data: [DONE]`."""
        async for line in self._call_stream(request, "completions_stream"):
            yield line

    async def chat_stream(self, request) -> AsyncIterator[str]:
        async for line in self._call_stream(request, "chat_stream"):
            yield line

    def _python_model(self, request) -> str:
        model = getattr(request, "model", None) or self.default_model
        if model not in self.handles:
            raise ValueError(f"model {model!r} is not served here; served models: {', '.join(sorted(self.handles))}")
        return model

    async def _call(self, request, method: str):
        """Routed, retried and timed like HTTP; no answer -> vLLM's `ErrorResponse` (503, 504 or 422)."""
        model = self._python_model(request)
        try:
            answer, _, flight = await self._open(model, lambda handle: getattr(handle, method).remote(request),
                                                 fingerprint=lambda: _python_fingerprint(request))
        except _Unanswered as no:
            return no.as_error_response()
        flight.release()
        return answer

    async def _call_stream(self, request, method: str) -> AsyncIterator[str]:
        """Routed, retried and timed like HTTP until the first line; no answer -> one SSE line with
        vLLM's `ErrorResponse` (as the replica sends a request's error)."""
        model = self._python_model(request)
        try:
            first, stream, flight = await self._open(
                model, lambda handle: getattr(handle.options(stream=True), method).remote(request),
                fingerprint=lambda: _python_fingerprint(request))
        except _Unanswered as no:
            yield f"data: {no.as_error_response().model_dump_json()}\n\n"
            return
        try:
            yield first
            while True:
                try:
                    line = await _next_chunk(stream, self.retry.idle_timeout_s)
                except StopAsyncIteration:
                    break
                yield line
        except _RelayIdle:
            logger.error("a replica sent nothing for %.0f s in the middle of a stream: it is ended",
                         self.retry.idle_timeout_s)
            idle = _Unanswered(504, f"the replica sent nothing for {self.retry.idle_timeout_s:.0f} s "
                                    f"(retry.idle_timeout_s); the stream was ended", "GatewayTimeoutError")
            yield f"data: {idle.as_error_response().model_dump_json()}\n\n"
        finally:
            flight.release(stream)

