from cluster.policy import Route
from cluster.routing import choose_variant


def route(n, running, accepting=True, b=32):
    return Route(n=n, deployment=f"LLM:m@n{n}", accepting=accepting, running=running, max_num_seqs=b)


def test_requests_go_to_the_accepting_variant_with_the_most_free_capacity():
    routes = [route(1, 1, b=64), route(2, 2, b=32)]
    assert choose_variant(routes, {"LLM:m@n1": 0, "LLM:m@n2": 0}) == "LLM:m@n1"  # equal capacity 64: the smaller N wins the tie
    assert choose_variant(routes, {"LLM:m@n1": 10, "LLM:m@n2": 0}) == "LLM:m@n2"
    assert choose_variant(routes, {"LLM:m@n1": 10, "LLM:m@n2": 60}) == "LLM:m@n1"


def test_a_draining_variant_gets_nothing_while_another_can_take_the_request():
    routes = [route(1, 1), route(2, 2, accepting=False)]
    assert all(choose_variant(routes, {"LLM:m@n1": k, "LLM:m@n2": 0}) == "LLM:m@n1" for k in (0, 100))


def test_variants_without_running_replicas_are_the_last_resort():
    warming = [route(1, 0), route(2, 1, accepting=False)]
    assert choose_variant(warming, {}) == "LLM:m@n2"  # a draining replica that runs beats one that does not exist yet
    assert choose_variant([route(1, 0), route(2, 0, accepting=False)], {}) == "LLM:m@n1"
    assert choose_variant([], {}) is None


class _Stream:
    """A replica stream that yields some chunks, then fails the way `fail` says."""

    def __init__(self, chunks, fail=None):
        self.chunks, self.fail, self.cancelled = list(chunks), fail, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class _Ingress:
    def __init__(self):
        self.inflight = {}


def _relay_all(stream):
    import asyncio

    from deployments.ingress import OpenAIIngress, _Flight

    ingress = _Ingress()
    flight = _Flight(ingress, "m", "LLM:m@n2")
    assert ingress.inflight == {("m", "LLM:m@n2"): 1}

    async def run():
        return [c async for c in OpenAIIngress._relay(ingress, stream, flight)]

    try:
        return asyncio.run(run()), ingress
    except Exception as exc:
        return exc, ingress


def test_a_stream_that_ends_or_fails_any_way_leaves_nothing_counted_in_flight():
    from ray.exceptions import RayActorError

    out, ingress = _relay_all(_Stream([b"a", b"b"]))
    assert out == [b"a", b"b"] and ingress.inflight == {("m", "LLM:m@n2"): 0}
    out, ingress = _relay_all(_Stream([b"a"], fail=RayActorError()))
    assert out[0] == b"a" and b'"code": 503' in out[1] and out[1].endswith(b"data: [DONE]\n\n")
    assert ingress.inflight == {("m", "LLM:m@n2"): 0}
    out, ingress = _relay_all(_Stream([b"a"], fail=RuntimeError("boom")))  # not an actor error
    assert isinstance(out, RuntimeError) and ingress.inflight == {("m", "LLM:m@n2"): 0}


def test_releasing_a_flight_twice_counts_once_and_cancels_the_stream():
    from deployments.ingress import _Flight

    ingress, stream = _Ingress(), _Stream([])
    flight = _Flight(ingress, "m", "LLM:m@n1")
    flight.release(stream)
    flight.release(stream)
    assert ingress.inflight == {("m", "LLM:m@n1"): 0} and stream.cancelled


class _Remote:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        async def call():
            return self._fn(*args)
        return call()


class _Fired:
    """A fire-and-forget actor method: it runs when called; nobody awaits it."""

    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        self._fn(*args)


class _Board:
    """The status board's methods the ingress's route refresh calls."""

    def __init__(self, routes):
        self.routes = _Remote(lambda app: routes)
        self.set_placement = _Remote(lambda placement: None)
        self.reports = []
        self.report_replica = _Fired(lambda app, report: self.reports.append(report))


def test_health_and_models_follow_the_board_before_any_request_was_routed():
    """Probes (a load balancer's /health, a client's /v1/models) may be all an ingress sees for a
    while: they must still report the board's running replicas, not the start placement's."""
    import asyncio

    from deployments.ingress import OpenAIIngress, ServedModel

    ingress = object.__new__(OpenAIIngress)
    ingress.models = {"m": ServedModel(name="m", max_model_len=None, replicas=2)}
    ingress.handles, ingress.api_key, ingress.inflight = {"m": {"LLM:m@n2": object()}}, None, {}
    ingress.routes = {"m": [route(2, 2)]}  # the start placement: both replicas running
    ingress.placement = type("P", (), {"app": "plateau"})()
    ingress._board, ingress._refresher = _Board({"m": [route(2, 0)]}), None  # the board: none running now
    ingress.app_name, ingress.replica_id = "plateau", "SERVE_REPLICA::plateau#OpenAIIngress#a"

    async def probe_twice():
        first = ingress._health()
        await asyncio.sleep(0.05)  # one refresh
        second = ingress._health()
        ingress._refresher.cancel()
        return first.status_code, second.status_code

    assert asyncio.run(probe_twice()) == (200, 503)
    assert ingress._replicas("m") == 0
    # each refresh also tells the routers where the Python path is
    assert ingress._board.reports and ingress._board.reports[0].role == "ingress"
    assert ingress._board.reports[0].replica_id == "SERVE_REPLICA::plateau#OpenAIIngress#a"


def test_a_request_waits_only_where_the_model_still_runs():
    from deployments.ingress import should_reroute

    assert not should_reroute([route(1, 0), route(2, 1)], "LLM:m@n2")  # its variant runs and accepts: stay
    assert should_reroute([route(1, 1), route(2, 1, accepting=False)], "LLM:m@n2")  # drained while it waited: go to N=1
    assert should_reroute([route(1, 1), route(2, 0)], "LLM:m@n2")  # its variant lost every replica, N=1 runs
    assert not should_reroute([route(1, 0), route(2, 0, accepting=False)], "LLM:m@n2")  # nowhere better: keep waiting


class _Queued:
    """A replica stream still queued: no first item until cancelled."""

    def __init__(self):
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        import asyncio

        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


def _http(body: bytes = b'{"model": "m", "prompt": "hi"}', **kwargs):
    from deployments.asgi import HttpRequest

    return HttpRequest(method="POST", path="/v1/completions", body=body, **kwargs)


_COMPLETION = _http()


class _Handle:
    def __init__(self, stream):
        self.stream, self.calls = stream, 0
        self.http = self  # handle.options(stream=True).http.remote(req) -> the stream

    def options(self, stream):
        return self

    def remote(self, req):
        self.calls += 1
        return self.stream


def test_a_request_queued_at_a_variant_that_drains_is_sent_where_the_model_now_runs(monkeypatch):
    """A request queued at a variant scaled to zero is sent where the model now runs, instead of waiting
    for good (or 15 minutes)."""
    import asyncio

    from deployments import ingress as mod
    from cluster.routing import DeathLedger
    from deployments.asgi import HttpStart
    from deployments.ingress import OpenAIIngress, RetryPolicy

    monkeypatch.setattr(mod, "REROUTE_CHECK_S", 0.02)
    queued, served = _Queued(), _Stream([HttpStart(status=200), b"data: {}\n\n"])
    old, new = _Handle(queued), _Handle(served)
    ingress = object.__new__(OpenAIIngress)
    ingress.handles, ingress.inflight, ingress.retry = {"m": {"LLM:m@n1": new, "LLM:m@n2": old}}, {}, RetryPolicy(attempts=2)
    ingress.routes = {"m": [route(1, 0), route(2, 1)]}  # N=1 warms, N=2 serves
    ingress._board, ingress._refresher, ingress.deaths = None, None, DeathLedger()

    async def send_then_drain():
        sent = asyncio.ensure_future(OpenAIIngress._send(ingress, "m", req=_COMPLETION))
        await asyncio.sleep(0.1)
        assert not sent.done() and old.calls == 1  # waiting in N=2's queue
        ingress.routes = {"m": [route(1, 1), route(2, 1, accepting=False)]}  # the policy drains N=2
        return await asyncio.wait_for(sent, 5)

    response = asyncio.run(send_then_drain())
    assert response.status_code == 200 and new.calls == 1 and queued.cancelled
    assert ingress.inflight == {("m", "LLM:m@n2"): 0, ("m", "LLM:m@n1"): 1}  # N=1's until the body is relayed


# ---- the Python API (DeploymentHandle) is routed, retried and timed like HTTP -----------------------

class _Answer:
    """A replica's non-streaming answer: `value` (raised when an exception), or never when None."""

    def __init__(self, value=None):
        self.value, self.cancelled = value, False

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        import asyncio

        if self.value is None:
            await asyncio.sleep(3600)
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def cancel(self):
        self.cancelled = True


class _PyHandle:
    """`handle.completions.remote(req)` and `handle.options(stream=True).completions_stream.remote(req)`:
    each call takes the next of `answers`."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0
        self.completions = self.completions_stream = self

    def options(self, stream):
        return self

    def remote(self, req):
        self.calls += 1
        return self.answers.pop(0)


def _python_ingress(handles, routes, **retry):
    from cluster.routing import DeathLedger
    from deployments.ingress import OpenAIIngress, RetryPolicy

    ingress = object.__new__(OpenAIIngress)
    ingress.handles, ingress.inflight, ingress.default_model = {"m": handles}, {}, "m"
    ingress.retry = RetryPolicy(**{"attempts": 3, "backoff_s": 0.0, **retry})
    ingress.routes = {"m": routes}
    ingress._board, ingress._refresher, ingress.deaths = None, None, DeathLedger()
    return ingress


class _Req:
    model = "m"

    def __init__(self, prompt: str = "hi"):
        self.prompt = prompt

    def model_dump_json(self, exclude=()):
        return f'{{"model": "m", "prompt": "{self.prompt}"}}'


def test_a_python_call_queued_at_a_variant_that_drains_is_sent_where_the_model_now_runs(monkeypatch):
    import asyncio

    from deployments import ingress as mod
    from deployments.ingress import OpenAIIngress

    monkeypatch.setattr(mod, "REROUTE_CHECK_S", 0.02)
    queued = _Answer()
    old, new = _PyHandle(queued), _PyHandle(_Answer("the answer"))
    ingress = _python_ingress({"LLM:m@n1": new, "LLM:m@n2": old}, [route(1, 0), route(2, 1)])

    async def call_then_drain():
        sent = asyncio.ensure_future(OpenAIIngress._call(ingress, _Req(), "completions"))
        await asyncio.sleep(0.1)
        assert not sent.done() and old.calls == 1
        ingress.routes = {"m": [route(1, 1), route(2, 1, accepting=False)]}
        return await asyncio.wait_for(sent, 5)

    assert asyncio.run(call_then_drain()) == "the answer"
    assert new.calls == 1 and queued.cancelled and ingress.inflight == {("m", "LLM:m@n2"): 0, ("m", "LLM:m@n1"): 0}


def test_a_python_call_that_met_a_dead_engine_or_replica_is_sent_again():
    import asyncio

    from ray.exceptions import RayActorError

    from deployments.engine import EngineDead
    from deployments.ingress import OpenAIIngress

    # dead when it came (not counted against it), then its replica died with it: sent a third time
    handle = _PyHandle(_Answer(EngineDead("dead", ran=False)), _Answer(RayActorError()), _Answer("the answer"))
    ingress = _python_ingress({"LLM:m@n1": handle}, [route(1, 1)])
    assert asyncio.run(OpenAIIngress._call(ingress, _Req(), "completions")) == "the answer"
    assert handle.calls == 3 and ingress.inflight == {("m", "LLM:m@n1"): 0}

    gone = _PyHandle(*[_Answer(EngineDead("dead", ran=False)) for _ in range(3)])
    ingress = _python_ingress({"LLM:m@n1": gone}, [route(1, 1)])
    out = asyncio.run(OpenAIIngress._call(ingress, _Req(), "completions"))  # vLLM's ErrorResponse, not a raise
    assert out.error.code == 503 and "engine is dead" in out.error.message and gone.calls == 3


def test_a_python_call_that_gets_no_answer_in_time_gets_a_504_not_a_hang(monkeypatch):
    import asyncio

    from deployments import ingress as mod
    from deployments.ingress import OpenAIIngress

    monkeypatch.setattr(mod, "REROUTE_CHECK_S", 0.02)
    queued = _Answer()
    ingress = _python_ingress({"LLM:m@n1": _PyHandle(queued)}, [route(1, 1)], first_byte_timeout_s=0.1)
    out = asyncio.run(asyncio.wait_for(OpenAIIngress._call(ingress, _Req(), "completions"), 5))
    assert out.error.code == 504 and out.error.type == "GatewayTimeoutError"
    assert queued.cancelled and ingress.inflight == {("m", "LLM:m@n1"): 0}


def test_a_python_stream_is_retried_before_its_first_line_and_relayed_whole_after():
    import asyncio

    from ray.exceptions import RayActorError

    from deployments.ingress import OpenAIIngress

    lines = ["data: 1\n\n", "data: 2\n\n", "data: [DONE]\n\n"]
    served = _Stream(lines)
    handle = _PyHandle(_Stream([], fail=RayActorError()), served)
    ingress = _python_ingress({"LLM:m@n1": handle}, [route(1, 1)])

    async def read():
        return [line async for line in OpenAIIngress._call_stream(ingress, _Req(), "completions_stream")]

    assert asyncio.run(read()) == lines and handle.calls == 2 and ingress.inflight == {("m", "LLM:m@n1"): 0}


# ---- one model served on several device types ------------------------------------

def test_a_model_on_two_device_types_routes_over_the_variants_of_both_by_free_capacity():
    from deployments.ingress import ServedModel, merge_routes

    small = Route(n=1, deployment="LLM:m_small@n1", accepting=True, running=1, max_num_seqs=8)
    large = Route(n=2, deployment="LLM:m_large@n2", accepting=True, running=2, max_num_seqs=32)
    other = Route(n=1, deployment="LLM:o@n1", accepting=True, running=1, max_num_seqs=8)
    served = [ServedModel(name="m", max_model_len=2048, replicas=3, keys=["m@small", "m@large"]),
              ServedModel(name="o", max_model_len=2048, replicas=1)]
    routes = merge_routes({"m@small": [small], "m@large": [large], "o": [other]}, served)
    assert routes == {"m": [small, large], "o": [other]}
    assert choose_variant(routes["m"], {}) == "LLM:m_large@n2"  # 64 free against 8
    assert choose_variant(routes["m"], {"LLM:m_large@n2": 60}) == "LLM:m_small@n1"


def test_the_proxies_to_renice_are_the_proxy_actors_and_what_they_started():
    """With Ray's HAProxy ingress the tokens pass through HAProxy, which its manager actor starts
    (and starts again on reloads): the manager and its processes are reniced, other actors not."""
    import subprocess
    import time

    import psutil

    from deployments.ingress import proxy_pids

    def actor(name: str) -> subprocess.Popen:  # a process whose argv[0] is an actor's, with a child
        return subprocess.Popen(["bash", "-c", f"exec -a '{name}' bash -c 'sleep 60 & wait'"])

    manager, replica = actor("ray::HAProxyManager"), actor("ray::ServeReplica:plateau:LLM:m@n2")
    try:
        procs = [psutil.Process(manager.pid), psutil.Process(replica.pid)]
        deadline = time.monotonic() + 10
        while not all(p.children() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        [haproxy] = procs[0].children()
        [replica_child] = procs[1].children()
        assert sorted(proxy_pids(procs)) == sorted([manager.pid, haproxy.pid])
        assert replica.pid not in proxy_pids(procs) and replica_child.pid not in proxy_pids(procs)
    finally:
        for p in (manager, replica):
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
            p.kill()
            p.wait()


# ---- request body limits, and a response cancelled before its first byte -----------------------

def test_a_relayed_response_cancelled_at_its_start_is_no_longer_counted_in_flight():
    """The client went away (or the proxy cancelled the request) as the status line went out: the
    body iterator and the background task never ran, and the request stayed counted on its variant."""
    import asyncio

    from cluster.routing import DeathLedger
    from deployments.asgi import HttpStart
    from deployments.ingress import OpenAIIngress, RetryPolicy

    for spec_version in ("2.4", "2.3"):  # Starlette streams the two ASGI versions differently
        served = _Stream([HttpStart(status=200), b"data: {}\n\n"])
        ingress = object.__new__(OpenAIIngress)
        ingress.handles, ingress.inflight, ingress.retry = {"m": {"LLM:m@n1": _Handle(served)}}, {}, RetryPolicy()
        ingress.routes, ingress._board, ingress._refresher = {"m": [route(1, 1)]}, None, None
        ingress.deaths = DeathLedger()

        async def respond_then_cancel():
            response = await OpenAIIngress._send(ingress, "m", req=_COMPLETION)
            assert ingress.inflight == {("m", "LLM:m@n1"): 1}

            async def receive():
                await asyncio.sleep(3600)

            async def send(message):
                if message["type"] == "http.response.start":
                    raise asyncio.CancelledError

            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
            try:
                await response(scope, receive, send)
            except asyncio.CancelledError:
                pass

        asyncio.run(respond_then_cancel())
        assert ingress.inflight == {("m", "LLM:m@n1"): 0} and served.cancelled, spec_version


def _limited_ingress(limits):
    from deployments.ingress import OpenAIIngress

    ingress = object.__new__(OpenAIIngress)
    ingress.handles, ingress.inflight, ingress.api_key, ingress.limits = {"m": {}}, {}, None, limits
    ingress.default_model, ingress.data_requests = "m", 0
    return ingress


def test_the_ingress_answers_a_body_too_big_or_too_deep_itself_in_vllms_format():
    import asyncio
    import json

    from cluster.routing import RequestLimits
    from deployments.asgi import HttpRequest
    from deployments.ingress import OpenAIIngress

    ingress = _limited_ingress(RequestLimits(max_body_bytes=2048, max_json_depth=16))

    def answer(body, path="/v1/completions"):
        response = asyncio.run(OpenAIIngress._respond(ingress, HttpRequest(method="POST", path=path, body=body)))
        return response.status_code, json.loads(response.body)["error"]

    status, error = answer(b'{"model": "m", "prompt": ' + b"[" * 17 + b"]" * 17 + b"}")
    assert status == 400 and error["code"] == 400 and "limits.max_json_depth" in error["message"]
    assert answer(b"[" * 2000)[0] == 400  # deeper than Python's parser goes: no RecursionError, no 500
    status, error = answer(b"x" * 2049, path="/v1/anything")  # a cut body is never served, on any path
    assert status == 413 and error["code"] == 413 and "limits.max_body_bytes" in error["message"]
    assert ingress.data_requests == 0  # none was sent to a replica


def test_the_ingress_reads_a_body_only_up_to_the_first_byte_over_the_limit():
    import asyncio

    from starlette.requests import Request

    from deployments.ingress import _http_request

    reads = []

    async def receive():  # an endless body in 1 KiB pieces
        reads.append(True)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "headers": []}
    req = asyncio.run(asyncio.wait_for(_http_request(Request(scope, receive), max_bytes=2048), 5))
    assert len(req.body) > 2048 and len(reads) == 3
