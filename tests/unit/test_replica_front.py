"""An LLM replica's own HTTP server: what it answers itself, what it gives vLLM's app, and what it
hands the ingress; on a fake vLLM app and a fake ingress (the real ones: tests/ray)."""

import asyncio
import json

from deployments.asgi import HttpStart
from deployments.replica_front import HEALTH_CHECK_PATH, ReplicaFront


class FakeVllm:
    """An ASGI app that streams `chunks` for every request (vLLM's app, as far as the front sees it)."""

    def __init__(self, chunks=(b"data: 1\n\n", b"data: [DONE]\n\n"), status=200, on_call=None):
        self.chunks, self.status, self.on_call = chunks, status, on_call
        self.bodies = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        if self.on_call:
            self.on_call()
        await send({"type": "http.response.start", "status": self.status, "headers": [(b"x-vllm", b"1")]})
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class FakeIngress:
    def __init__(self):
        self.requests = []

    def __call__(self, req):
        self.requests.append(req)

        async def items():
            yield HttpStart(status=404 if req.method == "POST" else 200, headers=[("content-type", "application/json")])
            yield b'{"from": "ingress"}'
        return items()


def front(app=None, api_key=None, dead=lambda: False):
    ingress = FakeIngress()
    f = ReplicaFront(app or FakeVllm(), "m", "m", api_key, relay=ingress, engine_dead=dead)
    return f, ingress


def call(f, method, path, body=b"", headers=()):
    """One request through the ASGI app: (status, headers, body)."""
    sent = []
    read = []

    async def receive():  # the body once; then, as uvicorn does, nothing until the client goes away
        if not read:
            read.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(f(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]),
            b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def completion(model="m"):
    return json.dumps({"model": model, "prompt": "hi", "stream": True}).encode()


def test_its_own_model_goes_to_vllm_and_is_counted():
    f, ingress = front()
    status, headers, body = call(f, "POST", "/v1/completions", completion())
    assert (status, headers.get("x-vllm"), body) == (200, "1", b"data: 1\n\ndata: [DONE]\n\n")
    assert f.app.bodies == [completion()] and ingress.requests == []
    assert (f.received, f.ongoing, f.relayed) == (1, 0, 0)
    assert call(f, "POST", "/v1/chat/completions", b'{"messages": []}')[0] == 200  # no model: the default, this one


def test_another_models_request_and_the_app_wide_endpoints_are_handed_to_the_ingress():
    f, ingress = front()
    assert call(f, "POST", "/v1/completions", completion("other"))[2] == b'{"from": "ingress"}'
    for path in ("/health", "/v1/models", "/version", "/openapi.json"):
        assert call(f, "GET", path)[0] == 200
    assert [r.path for r in ingress.requests] == ["/v1/completions", "/health", "/v1/models", "/version",
                                                  "/openapi.json"]
    assert ingress.requests[0].body == completion("other")
    assert f.app.bodies == [] and f.received == 0


def test_the_api_key_is_checked_before_vllm_sees_the_request():
    f, ingress = front(api_key="s3cret")
    status, _, body = call(f, "POST", "/v1/completions", completion())
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert call(f, "POST", "/v1/completions", completion(), [("authorization", "Bearer wrong")])[0] == 401
    assert call(f, "GET", "/v1/models")[0] == 401
    assert f.app.bodies == [] and ingress.requests == []
    assert call(f, "POST", "/v1/completions", completion(), [("authorization", "Bearer s3cret")])[0] == 200
    assert call(f, "GET", "/health")[0] == 200  # open, as on vLLM's server
    assert call(f, "GET", HEALTH_CHECK_PATH)[0] == 200  # HAProxy's check carries no key


def test_haproxys_health_check_fails_once_the_replica_stops_or_its_engine_died():
    dead = [False]
    f, _ = front(dead=lambda: dead[0])
    assert call(f, "GET", HEALTH_CHECK_PATH)[:3:2] == (200, b"success")
    dead[0] = True
    assert call(f, "GET", HEALTH_CHECK_PATH)[0] == 503
    dead[0], f.stopping = False, True
    assert call(f, "GET", HEALTH_CHECK_PATH)[0] == 503


def test_a_request_that_meets_a_dead_engine_before_any_output_goes_to_the_ingress():
    dead = [True]
    f, ingress = front(dead=lambda: dead[0])
    assert call(f, "POST", "/v1/completions", completion())[2] == b'{"from": "ingress"}'  # dead before: not tried
    assert f.app.bodies == [] and not ingress.requests[0].engine_died  # not this request's doing

    # the engine dies while vLLM takes the request: its error event is not sent, the ingress retries elsewhere
    dead[0] = False
    died = FakeVllm(chunks=(b'data: {"error": {"message": "EngineCore died", "code": 500}}\n\n',),
                    on_call=lambda: dead.__setitem__(0, True))
    f, ingress = front(app=died, dead=lambda: dead[0])
    status, _, body = call(f, "POST", "/v1/completions", completion())
    assert body == b'{"from": "ingress"}' and len(ingress.requests) == 1 and f.ongoing == 0
    assert ingress.requests[0].engine_died  # the ingress counts this death against the request's body


def test_a_live_engines_own_errors_are_the_answer():
    f, ingress = front(app=FakeVllm(chunks=(b'{"error": {"message": "bad", "code": 400}}',), status=400))
    status, _, body = call(f, "POST", "/v1/completions", completion())
    assert status == 400 and b"bad" in body and ingress.requests == []


def test_an_unreachable_ingress_is_a_503_in_vllms_format():
    def broken(req):
        async def items():
            raise RuntimeError("no ingress")
            yield  # pragma: no cover
        return items()

    f = ReplicaFront(FakeVllm(), "m", "m", None, relay=broken, engine_dead=lambda: False)
    status, _, body = call(f, "GET", "/v1/models")
    assert status == 503 and json.loads(body)["error"]["type"] == "ServiceUnavailableError"


def test_a_relay_ends_when_the_client_goes_away_and_is_counted_while_it_streams():
    started, cancelled = asyncio.Event(), []

    def slow_ingress(req):
        async def items():
            yield HttpStart(status=200, headers=[])
            started.set()
            try:
                await asyncio.sleep(3600)
                yield b"never"
            finally:
                cancelled.append(True)
        return items()

    f = ReplicaFront(FakeVllm(), "m", "m", None, relay=slow_ingress, engine_dead=lambda: False)
    gone = asyncio.Event()

    async def run():
        messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

        async def receive():
            try:
                return next(messages)
            except StopIteration:
                await gone.wait()
                return {"type": "http.disconnect"}

        async def send(message):
            pass

        scope = {"type": "http", "method": "GET", "path": "/v1/models", "query_string": b"", "headers": []}
        call = asyncio.ensure_future(f(scope, receive, send))
        await asyncio.wait_for(started.wait(), 5)
        assert f.relaying == 1 and f.busy()  # a stopping replica waits for it
        gone.set()
        await asyncio.wait_for(call, 5)

    asyncio.run(run())
    assert cancelled == [True] and f.relaying == 0 and not f.busy()


def test_a_client_that_leaves_before_its_body_arrived_gets_nothing_run():
    f, ingress = front()

    async def run():
        messages = iter([{"type": "http.request", "body": b'{"model": "m", ', "more_body": True},
                         {"type": "http.disconnect"}])

        async def receive():
            return next(messages)

        async def send(message):
            raise AssertionError("nothing is sent to a client that went away")

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": []}
        await f(scope, receive, send)

    asyncio.run(run())
    assert f.app.bodies == [] and ingress.requests == [] and f.received == 0


def test_a_body_over_the_size_limit_gets_413_unread_and_one_nested_too_deep_400_before_vllm():
    from cluster.routing import RequestLimits

    ingress = FakeIngress()
    f = ReplicaFront(FakeVllm(), "m", "m", None, relay=ingress, engine_dead=lambda: False,
                     limits=RequestLimits(max_body_bytes=2048, max_json_depth=16))
    reads, sent = [], []

    async def run():
        async def receive():  # an endless body in 1 KiB pieces
            reads.append(True)
            return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": []}
        await asyncio.wait_for(f(scope, receive, send), 5)

    asyncio.run(run())
    assert sent[0]["status"] == 413 and len(reads) == 3  # read up to the first byte over the limit, no further
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == 413 and "limits.max_body_bytes" in error["message"]
    status, _, body = call(f, "POST", "/v1/completions", b'{"model": "m", "prompt": ' + b"[" * 17 + b"]" * 17 + b"}")
    assert status == 400 and "limits.max_json_depth" in json.loads(body)["error"]["message"]
    assert f.app.bodies == [] and ingress.requests == [] and f.received == 0
    assert call(f, "POST", "/v1/completions", completion())[0] == 200


def test_a_response_cancelled_at_its_start_leaves_nothing_counted():
    f, _ = front()

    async def run():
        async def receive():
            return {"type": "http.request", "body": completion(), "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                raise asyncio.CancelledError

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": []}
        try:
            await f(scope, receive, send)
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    assert (f.received, f.ongoing) == (1, 0) and not f.busy()
