from cluster.policy import Route
from deployments.ingress import choose_variant


def route(n, running, accepting=True, b=32):
    return Route(n=n, deployment=f"LLM:m@n{n}", accepting=accepting, running=running, max_num_seqs=b)


def test_requests_go_to_the_accepting_variant_with_the_most_free_capacity():
    routes = [route(1, 1, b=64), route(2, 2, b=32)]
    assert choose_variant(routes, {1: 0, 2: 0}) == 1  # equal capacity 64: the smaller N wins the tie
    assert choose_variant(routes, {1: 10, 2: 0}) == 2
    assert choose_variant(routes, {1: 10, 2: 60}) == 1


def test_a_draining_variant_gets_nothing_while_another_can_take_the_request():
    routes = [route(1, 1), route(2, 2, accepting=False)]
    assert all(choose_variant(routes, {1: k, 2: 0}) == 1 for k in (0, 100))


def test_variants_without_running_replicas_are_the_last_resort():
    warming = [route(1, 0), route(2, 1, accepting=False)]
    assert choose_variant(warming, {}) == 2  # a draining replica that runs beats one that does not exist yet
    assert choose_variant([route(1, 0), route(2, 0, accepting=False)], {}) == 1
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
    flight = _Flight(ingress, "m", 2)
    assert ingress.inflight == {("m", 2): 1}

    async def run():
        return [c async for c in OpenAIIngress._relay(ingress, stream, flight)]

    try:
        return asyncio.run(run()), ingress
    except Exception as exc:
        return exc, ingress


def test_a_stream_that_ends_or_fails_any_way_leaves_nothing_counted_in_flight():
    from ray.exceptions import RayActorError

    out, ingress = _relay_all(_Stream([b"a", b"b"]))
    assert out == [b"a", b"b"] and ingress.inflight == {("m", 2): 0}
    out, ingress = _relay_all(_Stream([b"a"], fail=RayActorError()))
    assert out[0] == b"a" and b'"code": 503' in out[1] and out[1].endswith(b"data: [DONE]\n\n")
    assert ingress.inflight == {("m", 2): 0}
    out, ingress = _relay_all(_Stream([b"a"], fail=RuntimeError("boom")))  # not an actor error
    assert isinstance(out, RuntimeError) and ingress.inflight == {("m", 2): 0}


def test_releasing_a_flight_twice_counts_once_and_cancels_the_stream():
    from deployments.ingress import _Flight

    ingress, stream = _Ingress(), _Stream([])
    flight = _Flight(ingress, "m", 1)
    flight.release(stream)
    flight.release(stream)
    assert ingress.inflight == {("m", 1): 0} and stream.cancelled


class _Remote:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        async def call():
            return self._fn(*args)
        return call()


class _Board:
    """The status board's two methods the ingress's route refresh calls."""

    def __init__(self, routes):
        self.routes = _Remote(lambda app: routes)
        self.set_placement = _Remote(lambda placement: None)


def test_health_and_models_follow_the_board_before_any_request_was_routed():
    """Probes (a load balancer's /health, a client's /v1/models) may be all an ingress sees for a
    while: they must still report the board's running replicas, not the start placement's."""
    import asyncio

    from deployments.ingress import OpenAIIngress, ServedModel

    ingress = object.__new__(OpenAIIngress)
    ingress.models = {"m": ServedModel(name="m", max_model_len=None, replicas=2)}
    ingress.handles, ingress.api_key, ingress.inflight = {"m": {2: object()}}, None, {}
    ingress.routes = {"m": [route(2, 2)]}  # the start placement: both replicas running
    ingress.placement = type("P", (), {"app": "plateau"})()
    ingress._board, ingress._refresher = _Board({"m": [route(2, 0)]}), None  # the board: none running now

    async def probe_twice():
        first = await OpenAIIngress.health(ingress)
        await asyncio.sleep(0.05)  # one refresh
        second = await OpenAIIngress.health(ingress)
        ingress._refresher.cancel()
        return first.status_code, second.status_code

    assert asyncio.run(probe_twice()) == (200, 503)
    assert ingress._replicas("m") == 0


def test_a_request_waits_only_where_the_model_still_runs():
    from deployments.ingress import should_reroute

    assert not should_reroute([route(1, 0), route(2, 1)], 2)  # its variant runs and accepts: stay
    assert should_reroute([route(1, 1), route(2, 1, accepting=False)], 2)  # drained while it waited: go to N=1
    assert should_reroute([route(1, 1), route(2, 0)], 2)  # its variant lost every replica, N=1 runs
    assert not should_reroute([route(1, 0), route(2, 0, accepting=False)], 2)  # nowhere better: keep waiting


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
    """Issue 11: a request queued at a variant scaled to zero waited for good (or 15 minutes)."""
    import asyncio

    from deployments import ingress as mod
    from deployments.asgi import HttpStart
    from deployments.ingress import OpenAIIngress, RetryPolicy

    monkeypatch.setattr(mod, "REROUTE_CHECK_S", 0.02)
    queued, served = _Queued(), _Stream([HttpStart(status=200), b"data: {}\n\n"])
    old, new = _Handle(queued), _Handle(served)
    ingress = object.__new__(OpenAIIngress)
    ingress.handles, ingress.inflight, ingress.retry = {"m": {1: new, 2: old}}, {}, RetryPolicy(attempts=2)
    ingress.routes = {"m": [route(1, 0), route(2, 1)]}  # N=1 warms, N=2 serves
    ingress._board, ingress._refresher = None, None

    async def send_then_drain():
        sent = asyncio.ensure_future(OpenAIIngress._send(ingress, "m", req=None))
        await asyncio.sleep(0.1)
        assert not sent.done() and old.calls == 1  # waiting in N=2's queue
        ingress.routes = {"m": [route(1, 1), route(2, 1, accepting=False)]}  # the policy drains N=2
        return await asyncio.wait_for(sent, 5)

    response = asyncio.run(send_then_drain())
    assert response.status_code == 200 and new.calls == 1 and queued.cancelled
    assert ingress.inflight == {("m", 2): 0, ("m", 1): 1}  # N=1's until the body is relayed
