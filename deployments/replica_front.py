"""An LLM replica's own HTTP server: the end of the direct data path (`deployments/direct_path.py`).

The router pins each OpenAI POST to one replica and Ray's HAProxy forwards it here, where vLLM's
own app runs it over the replica's engine and streams the answer straight back: the replica is the
only Python process on the request's path, as in `vllm serve`. In front of vLLM's app
(`ReplicaFront`, an ASGI app):
- HAProxy's health check of the server (`/-/healthz`): 200 while the engine lives and the replica
  is not stopping, else 503;
- the API key, on every path but `/health` and the health check, before vLLM sees the request;
- the app's `RequestLimits`, before vLLM's app parses a body (413 for one too large, read no
  further; 400 for one nested too deep), in vLLM's error format: HAProxy hands the router at most
  its buffer of a body, so only this front sees every byte of a request pinned here;
- what is not this replica's goes the Python way, to the ingress (`relay`): a request for another
  model (HAProxy re-sends a request to any server of the app when its pinned one refused the
  connection), one that met a dead engine before anything was produced (the ingress tries another
  replica), and the app-wide endpoints (`/health`, `/v1/models`, `/version`, `/openapi.json`),
  which HAProxy balances over every server of the app.
It counts the requests it holds and took (`ongoing`, `received`), which the replica reports to
the routers (`cluster.routing.ReplicaReport`). `FrontServer` runs it on a port the Serve controller
allocates, with Serve's own HTTP settings (as Ray runs an ingress replica's server).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import AsyncIterator, Awaitable, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from cluster.routing import RequestLimits, body_refusal, model_of
from deployments.asgi import HttpItem, HttpRequest, HttpStart
from deployments.vllm_api import FORWARDED_PATHS as DATA_PATHS  # what vLLM answers here

logger = logging.getLogger("ray.serve")

HEALTH_CHECK_PATH = "/-/healthz"  # what Ray's HAProxy asks every server of an app (HAProxyConfig)
OPEN_PATHS = ("/health", HEALTH_CHECK_PATH)  # answered without the API key

Relay = Callable[[HttpRequest], AsyncIterator[HttpItem]]


class FrontSettings(BaseModel):
    """What an LLM replica's own server needs to know of its app."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    api_key: Optional[str] = Field(None, description="The app's API key (None: open).")
    default_model: str = Field(description="The model a request without `model` goes to (the app's first).")
    ingress: str = Field("OpenAIIngress", description="The ingress deployment: where requests are handed over.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="What a request body may be.")


def error_body(status: int, message: str, err_type: str) -> bytes:
    """vLLM's (OpenAI's) error format."""
    return json.dumps({"error": {"message": message, "type": err_type, "param": None, "code": status}}).encode()


def key_error(api_key: Optional[str], authorization: str) -> Optional[tuple[int, bytes]]:
    """The 401 for a missing or wrong `Authorization: Bearer <key>`; None when it is right or no key is set."""
    if not api_key:
        return None
    token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    if not token:
        return 401, error_body(401, "missing API key: send `Authorization: Bearer <key>`", "authentication_error")
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        return 401, error_body(401, "invalid API key", "authentication_error")
    return None


async def _send_whole(send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive, max_bytes: Optional[int] = None) -> Optional[bytes]:
    """The whole request body, or, once it runs past `max_bytes`, what was read so far (longer than
    `max_bytes`: it is refused, and reading on would hold all of it in memory); None when the client
    went away before sending all of it."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if not message.get("more_body", False) or (max_bytes is not None and size > max_bytes):
            return b"".join(parts)


class ReplicaFront:
    """The ASGI app of an LLM replica's own server: vLLM's `app` behind the checks above."""

    def __init__(self, app, served_name: str, default_model: str, api_key: Optional[str], relay: Relay,
                 engine_dead: Callable[[], bool], limits: RequestLimits = RequestLimits()):
        self.app, self.served_name, self.default_model = app, served_name, default_model
        self.api_key, self.relay, self.engine_dead, self.limits = api_key, relay, engine_dead, limits
        self.ongoing = 0  # requests inside vLLM's app now
        self.received = 0  # requests given to vLLM's app since start
        self.relayed = 0  # requests sent the Python way
        self.relaying = 0  # of those, the ones still streaming through this process
        self.stopping = False
        self.changed = asyncio.Event()  # set whenever `ongoing` moves: the reporter wakes up

    def healthy(self) -> bool:
        return not self.stopping and not self.engine_dead()

    def busy(self) -> bool:
        """Requests are under way here: vLLM's or handed over."""
        return self.ongoing > 0 or self.relaying > 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # uvicorn runs it with lifespan off; websockets are not served
            return
        path, method = scope["path"], scope["method"]
        if path == HEALTH_CHECK_PATH:
            ok = self.healthy()
            await _send_whole(send, 200 if ok else 503, b"success" if ok else b"stopping", b"text/plain")
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        if path not in OPEN_PATHS:
            denied = key_error(self.api_key, next((v for k, v in headers if k == "authorization"), ""))
            if denied is not None:
                await _send_whole(send, *denied)
                return
        body = await _read_body(receive, self.limits.max_body_bytes)
        if body is None:  # nothing to answer
            return
        refused = body_refusal(body, self.limits, parsed=method == "POST" and path in DATA_PATHS)
        if refused is not None:
            await _send_whole(send, refused.status, error_body(*refused))
            return
        req = HttpRequest(method=method, path=path, query_string=scope.get("query_string", b"").decode("latin-1"),
                          headers=headers, body=body)
        if method != "POST" or path not in DATA_PATHS or not self._mine(body) or self.engine_dead():
            await self._relay(req, receive, send)
            return
        self.ongoing += 1
        self.received += 1
        self.changed.set()
        try:
            produced = await self._run(scope, body, receive, send)
        finally:
            self.ongoing -= 1
            self.changed.set()
        if not produced:  # the engine died running it before answering: the ingress tries another replica once
            await self._relay(req.model_copy(update={"engine_died": True}), receive, send)

    def _mine(self, body: bytes) -> bool:
        return (model_of(body) or self.default_model) == self.served_name

    async def _run(self, scope, body: bytes, receive, send) -> bool:
        """vLLM's app on the request; False when its engine was dead before it produced anything
        (nothing was sent to the client then). The response start is held until the first body
        message, which tells a dead engine's error apart from an answer."""
        replayed = False
        start: Optional[dict] = None
        state = {"decided": False, "dead": False}

        async def receive_once() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, for vLLM to abort the request

        async def send_checked(message: dict) -> None:
            nonlocal start
            if state["decided"]:
                if not state["dead"]:
                    await send(message)
                return
            if message["type"] == "http.response.start":
                start = message
                return
            state["decided"] = True
            failed = start is not None and (start["status"] >= 500 or b'"error"' in message.get("body", b""))
            if failed and self.engine_dead():
                state["dead"] = True
                return
            if start is not None:
                await send(start)
            await send(message)

        await self.app(scope, receive_once, send_checked)
        return not state["dead"]

    async def _relay(self, req: HttpRequest, receive, send) -> None:
        """The request the Python way: the ingress answers it (routes, waits, retries, 404s). A client
        that goes away ends the relay (and so the ingress's request)."""
        self.relayed += 1
        self.relaying += 1
        relay = asyncio.ensure_future(self._relay_to(req, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, gone):
                task.cancel()
            await asyncio.gather(relay, gone, return_exceptions=True)
            self.relaying -= 1
        if relay.done() and not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()

    async def _relay_to(self, req: HttpRequest, send) -> None:
        items = self.relay(req)
        try:
            start = await anext(items)
        except Exception as exc:  # the ingress is unreachable: say so in vLLM's format
            logger.warning("could not hand %s %s to the ingress: %s", req.method, req.path, exc)
            await _send_whole(send, 503, error_body(503, f"the ingress is unavailable ({type(exc).__name__}); "
                                                         "retry the request", "ServiceUnavailableError"))
            return
        try:
            if not isinstance(start, HttpStart):
                raise TypeError(f"the ingress answered {type(start).__name__} first, not HttpStart")
            await send({"type": "http.response.start", "status": start.status,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in start.headers]})
            async for chunk in items:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await _close(items)


async def _disconnected(receive) -> None:
    """Returns once the client went away (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _close(items) -> None:
    aclose: Optional[Callable[[], Awaitable[None]]] = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
    elif hasattr(items, "cancel"):  # Serve's streaming response generator
        items.cancel()


class FrontServer:
    """Runs a `ReplicaFront` on a port the Serve controller allocated for this replica, with the
    controller's HTTP options (host, keep-alive) as Ray runs an ingress replica's own server."""

    BIND_TRIES = 3

    def __init__(self, port):
        self._port = port  # deployments.direct_path.ReplicaPort
        self._server = None
        self._task: Optional[asyncio.Task] = None

    async def start(self, front: ReplicaFront) -> int:
        from ray.serve._private.http_util import (configure_http_middlewares, configure_http_options_with_defaults,
                                                  start_asgi_http_server)
        from ray.serve.config import HTTPOptions

        options = await self._port.controller.get_http_config.remote()
        last: Optional[Exception] = None
        for _ in range(self.BIND_TRIES):
            port = await self._port.allocate()
            opts = configure_http_middlewares(configure_http_options_with_defaults(
                HTTPOptions(**{**options.model_dump(), "port": port})))
            try:
                self._task, self._server = await start_asgi_http_server(
                    front, opts, event_loop=asyncio.get_running_loop(), enable_so_reuseport=False)
                return port
            except RuntimeError as exc:  # taken by another process: the allocator skips it from now on
                last = exc
                await self._port.release(in_use_by_another=True)
        raise RuntimeError(f"could not start the replica's HTTP server on {self.BIND_TRIES} ports: {last}")

    def stop_accepting(self) -> None:
        """Close the listening socket (HAProxy's next connection fails and goes to another server);
        the connections open now are served to their end."""
        if self._server is not None:
            self._server.should_exit = True

    async def wait_closed(self, timeout_s: float) -> None:
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        self.stop_accepting()
        await self.wait_closed(timeout_s)
        await self._port.release()
