"""The in-process ASGI call the replicas use to run vLLM's app, and the ingress's body routing."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.asgi import HttpRequest, HttpStart, call_asgi
from deployments.ingress import model_of


def make_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.json()
        return JSONResponse({"got": body, "query": request.url.query}, status_code=201,
                            headers={"x-seen": request.headers.get("x-test", "")})

    @app.post("/stream")
    async def stream():
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def collect(app, req: HttpRequest, limit: int = 10_000) -> list:
    async def run():
        out = []
        gen = call_asgi(app, req)
        async for item in gen:
            out.append(item)
            if len(out) >= limit:
                await gen.aclose()
                break
        return out
    return asyncio.run(run())


def test_a_json_response_comes_back_whole_with_status_and_headers():
    req = HttpRequest(method="POST", path="/echo", query_string="a=1", headers=[("x-test", "yes"),
                      ("content-type", "application/json")], body=b'{"model": "m"}')
    items = collect(make_app([]), req)
    start, body = items[0], b"".join(items[1:])
    assert isinstance(start, HttpStart) and start.status == 201 and not start.retryable
    assert ("x-seen", "yes") in start.headers
    assert body == b'{"got":{"model":"m"},"query":"a=1"}'


def test_a_stream_arrives_chunk_by_chunk():
    items = collect(make_app([]), HttpRequest(method="POST", path="/stream"), limit=4)
    assert items[0].status == 200
    assert items[1:] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_closing_the_stream_disconnects_and_cancels_the_handler():
    events: list[str] = []
    collect(make_app(events), HttpRequest(method="POST", path="/stream"), limit=3)
    assert events == ["cancelled"]


def test_unknown_path_is_the_apps_own_404():
    items = collect(make_app([]), HttpRequest(method="POST", path="/nowhere"))
    assert items[0].status == 404


@pytest.mark.parametrize("body,model", [
    (b'{"model": "a", "prompt": "x"}', "a"),
    (b'{"prompt": "x"}', None),
    (b'{not json', None),
    (b'["a"]', None),
    (b'{"model": 5}', None),
    (b"\xff\xfe", None),
])
def test_model_of_reads_only_a_string_model(body, model):
    assert model_of(body) == model


def test_chunks_that_piled_up_go_out_together_in_order():
    async def burst_app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(5):  # no await between sends: they pile up before the consumer runs
            await send({"type": "http.response.body", "body": f"{i};".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    items = collect(burst_app, HttpRequest(method="GET", path="/"))
    assert items[0].status == 200 and b"".join(items[1:]) == b"0;1;2;3;4;"
    assert len(items) < 6
