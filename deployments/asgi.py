"""One HTTP request through an in-process ASGI app, as data that crosses a Ray handle.

The ingress forwards each OpenAI request to a replica as an `HttpRequest`; the replica runs it
through vLLM's own FastAPI app (`call_asgi`) and streams back an `HttpStart` (status, headers),
then the body chunks exactly as vLLM wrote them. So validation, error bodies, status codes and
the SSE stream are vLLM's, byte for byte. Closing the generator (the client went away) tells the
app the client disconnected and cancels it, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Union

from pydantic import BaseModel, ConfigDict, Field


class HttpRequest(BaseModel):
    """An HTTP request as the ingress received it (the body already read)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str = Field(description="HTTP method, e.g. POST.")
    path: str = Field(description="Path without the query string, e.g. /v1/completions.")
    query_string: str = Field("", description="Raw query string without '?'.")
    headers: list[tuple[str, str]] = Field(default_factory=list, description="Request headers, lower-case names.")
    body: bytes = Field(b"", description="The whole request body.")
    engine_died: bool = Field(
        False, description="Handed over by an LLM replica's own server whose engine died while it ran the request "
                           "(before anything was produced): the ingress counts that death against the request."
    )


class HttpStart(BaseModel):
    """The start of a response: what the client gets as status line and headers."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    status: int = Field(description="HTTP status code.")
    headers: list[tuple[str, str]] = Field(default_factory=list, description="Response headers.")
    retryable: bool = Field(
        False, description="The replica could not serve it (dead engine) and nothing was produced: "
                           "the ingress may send the same request to another replica."
    )
    ran: bool = Field(
        True, description="With `retryable`: the engine had the request when it died (the ingress counts that "
                          "death against the request); False when it was dead already when the request came."
    )


HttpItem = Union[HttpStart, bytes]
_END = object()


def _scope(req: HttpRequest) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "root_path": "",
        "query_string": req.query_string.encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def call_asgi(app, req: HttpRequest) -> AsyncIterator[HttpItem]:
    """Run `req` through the ASGI `app`; yield its `HttpStart`, then its non-empty body chunks.

    Chunks that piled up while the consumer was busy go out as one (no chunk ever waits for a
    later one): when the relay falls behind the engine, it catches up in fewer messages."""
    sent: deque = deque()  # messages the app sent, not yet consumed; _END once it returned
    wake = asyncio.Event()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        wake.set()

    async def run() -> None:
        try:
            await app(_scope(req), receive, send)
        finally:
            sent.append(_END)
            wake.set()

    task = asyncio.get_running_loop().create_task(run())
    started = finished = False
    try:
        while not finished:
            if not sent:
                wake.clear()
                await wake.wait()
            message = sent.popleft()
            if message is _END:
                break
            if message["type"] == "http.response.start":
                started = True
                yield HttpStart(status=int(message["status"]),
                                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                parts = [message.get("body", b"")]
                finished = not message.get("more_body", False)
                while not finished and sent and sent[0] is not _END and sent[0]["type"] == "http.response.body":
                    nxt = sent.popleft()
                    parts.append(nxt.get("body", b""))
                    finished = not nxt.get("more_body", False)
                body = b"".join(parts)
                if body:
                    yield body
        await task  # re-raises what the app raised after its response, if anything
        if not started:
            raise RuntimeError(f"the ASGI app sent no response to {req.method} {req.path}")
    finally:
        if not task.done():  # the consumer went away: tell the app, then stop it
            disconnected.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
