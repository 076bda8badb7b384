"""A request whose replica (or engine) dies while it has it is sent again at most once, and
a relayed answer whose replica goes silent is ended."""

import asyncio
import json

import pytest
from ray.exceptions import RayActorError

from cluster.routing import DeathLedger, request_fingerprint, retry_decision
from deployments.asgi import HttpStart
from deployments.engine import EngineDead
from deployments.ingress import OpenAIIngress, RetryPolicy, _Flight
from tests.unit.test_ingress_routing import _Answer, _http, _Ingress, _python_ingress, _Req, _Stream, route

POISON = b'{"model": "m", "prompt": "POISON"}'
SSE = [("content-type", "text/event-stream; charset=utf-8")]


class _Replicas:
    """Serve's handle of a variant with `n` replicas; each call goes to a live one. A body with
    POISON in it ends the replica that gets it (at most `kills` times, then it is served): its engine
    dies with the request in it (`how="engine"`, a retryable 503 as `LLMReplica.http` answers it) or
    the replica's process dies (`how="replica"`, RayActorError)."""

    def __init__(self, n: int = 6, how: str = "engine", kills: int = 1_000):
        self.alive, self.killed, self.calls, self.how, self.kills = list(range(n)), [], 0, how, kills
        self.http = self

    def options(self, stream):
        return self

    def remote(self, req):
        self.calls += 1
        replica = self.alive[self.calls % len(self.alive)]
        if b"POISON" in req.body and len(self.killed) < self.kills:
            self.alive.remove(replica)
            self.killed.append(replica)
            return _Stream([], fail=RayActorError()) if self.how == "replica" else _Stream(
                [HttpStart(status=503, retryable=True)])
        return _Stream([HttpStart(status=200, headers=SSE), b"data: ok\n\n", b"data: [DONE]\n\n"])


def _ingress(handle, **retry) -> OpenAIIngress:
    ingress = object.__new__(OpenAIIngress)
    ingress.handles, ingress.inflight = {"m": {"LLM:m@n1": handle}}, {}
    ingress.retry = RetryPolicy(**{"backoff_s": 0.0, **retry})
    ingress.routes, ingress._board, ingress._refresher = {"m": [route(1, 6)]}, None, None
    ingress.deaths = DeathLedger()
    return ingress


def _send(ingress, req) -> tuple[int, bytes]:
    async def run():
        response = await OpenAIIngress._send(ingress, "m", req)
        if hasattr(response, "body_iterator"):
            return response.status_code, b"".join([c async for c in response.body_iterator])
        return response.status_code, response.body

    return asyncio.run(asyncio.wait_for(run(), 10))


def _refused(status: int, body: bytes) -> bool:
    error = json.loads(body)["error"]
    return (status == 422 and error["code"] == 422 and error["type"] == "UnprocessableEntityError"
            and error["message"] == "this request ended its replica's engine twice; it is not retried again")


def test_a_request_goes_on_until_its_second_death_or_its_last_try():
    assert retry_decision(deaths=0, tries=1, attempts=6, max_deaths=2) == "retry"  # dead before it came
    assert retry_decision(deaths=1, tries=1, attempts=6, max_deaths=2) == "retry"  # once after a death
    assert retry_decision(deaths=2, tries=2, attempts=6, max_deaths=2) == "refuse"
    assert retry_decision(deaths=2, tries=0, attempts=6, max_deaths=2) == "refuse"  # a resend, before any try
    assert retry_decision(deaths=1, tries=6, attempts=6, max_deaths=2) == "unavailable"
    assert retry_decision(deaths=1, tries=1, attempts=6, max_deaths=1) == "refuse"


def test_the_ledger_forgets_a_body_once_answered_after_its_ttl_and_beyond_its_size():
    now = [0.0]
    ledger = DeathLedger(max_entries=2, ttl_s=600.0, clock=lambda: now[0])
    a, b, c = (request_fingerprint(b"/v1/completions", body) for body in (b"a", b"b", b"c"))
    assert len({a, b, c}) == 3 and request_fingerprint(b"/v1/completions", b"a") == a
    ledger.settle(a, 1)
    ledger.settle(a, 1)  # the same death, told by a second request with this body: the most known is kept
    assert ledger.deaths(a) == 1
    ledger.settle(a, 2)
    assert ledger.deaths(a) == 2
    ledger.clear(a)  # a request with this body was answered
    assert ledger.deaths(a) == 0 and len(ledger) == 0
    ledger.settle(a, 1)
    now[0] = 300.0
    ledger.settle(b, 1)
    now[0] = 600.0  # a's last death is 10 minutes old
    assert (ledger.deaths(a), ledger.deaths(b)) == (0, 1)
    ledger.settle(c, 1)
    ledger.settle(a, 1)  # a third body: the least recently dead (b) goes
    assert (ledger.deaths(a), ledger.deaths(b), ledger.deaths(c)) == (1, 0, 1)


@pytest.mark.parametrize("how", ["engine", "replica"])
def test_a_body_that_crashes_every_engine_it_reaches_ends_two_replicas_not_six(how):
    replicas = _Replicas(n=6, how=how)
    ingress = _ingress(replicas)
    assert _refused(*_send(ingress, _http(POISON)))
    assert len(replicas.killed) == 2 and ingress.inflight == {("m", "LLM:m@n1"): 0}
    # the client sends it again: answered at once, no replica gets it
    assert _refused(*_send(ingress, _http(POISON)))
    assert len(replicas.killed) == 2 and replicas.calls == 2
    # others are served meanwhile
    assert _send(ingress, _http()) == (200, b"data: ok\n\ndata: [DONE]\n\n")


def test_a_body_whose_replica_died_once_is_served_by_the_next_and_forgotten():
    replicas = _Replicas(n=6, kills=1)  # a transient death: an engine fault the body did not cause
    ingress = _ingress(replicas)
    assert _send(ingress, _http(POISON)) == (200, b"data: ok\n\ndata: [DONE]\n\n")
    assert len(replicas.killed) == 1 and len(ingress.deaths) == 0


def test_a_request_handed_over_after_its_engine_died_is_sent_once_more():
    """A replica's own server hands a request whose engine died running it to the ingress
    (`engine_died`): that was its first death."""
    replicas = _Replicas(n=6)
    ingress = _ingress(replicas)
    assert _refused(*_send(ingress, _http(POISON, engine_died=True)))
    assert len(replicas.killed) == 1  # the replica that handed it over plus this one: two
    replicas = _Replicas(n=6, kills=0)  # its death was not its doing: the next replica serves it
    assert _send(_ingress(replicas), _http(POISON, engine_died=True))[0] == 200 and replicas.calls == 1


def test_engines_dead_before_the_request_came_do_not_count_against_it():
    dead_on_arrival = HttpStart(status=503, retryable=True, ran=False)
    served = _Stream([HttpStart(status=200, headers=SSE), b"data: [DONE]\n\n"])
    handle = _PyHandle(*[_Stream([dead_on_arrival]) for _ in range(3)], served)
    handle.http = handle
    ingress = _ingress(handle)
    assert _send(ingress, _http()) == (200, b"data: [DONE]\n\n") and handle.calls == 4


def test_a_death_with_the_request_in_it_carries_over_to_a_resend_of_the_same_body(monkeypatch):
    """A request that died once and then timed out (or whose client went away) leaves its death
    behind: the resend is the second try, not the first."""
    from deployments import ingress as mod

    monkeypatch.setattr(mod, "REROUTE_CHECK_S", 0.02)

    class _Never(_Stream):
        async def __anext__(self):
            await asyncio.sleep(3600)

    died = _Stream([HttpStart(status=503, retryable=True)])
    handle = _PyHandle(died, _Never([]), _Stream([HttpStart(status=503, retryable=True)]))
    handle.http = handle
    ingress = _ingress(handle, first_byte_timeout_s=0.1)
    assert _send(ingress, _http(POISON))[0] == 504
    assert _refused(*_send(ingress, _http(POISON))) and handle.calls == 3


def test_identical_bodies_in_one_replica_as_it_died_are_each_sent_again():
    """A benchmark's or a prober's requests share one body: one death they all met is not two."""
    handle = _PyHandle(*[_Stream([], fail=RayActorError()) for _ in range(3)],
                       *[_Stream([HttpStart(status=200, headers=SSE), b"data: [DONE]\n\n"]) for _ in range(3)])
    handle.http = handle
    ingress = _ingress(handle)

    async def three():
        return await asyncio.gather(*(OpenAIIngress._send(ingress, "m", _http()) for _ in range(3)))

    assert [r.status_code for r in asyncio.run(asyncio.wait_for(three(), 10))] == [200, 200, 200]


class _PyHandle:
    """Each call (HTTP or Python API) takes the next of `answers`."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0
        self.completions = self.completions_stream = self

    def options(self, stream):
        return self

    def remote(self, req):
        self.calls += 1
        return self.answers.pop(0)


def test_a_python_call_that_crashes_engines_ends_two_and_gets_vllms_error_response():
    handle = _PyHandle(_Answer(EngineDead("died")), _Answer(RayActorError()), _Answer("never"))
    ingress = _python_ingress({"LLM:m@n1": handle}, [route(1, 1)])
    out = asyncio.run(OpenAIIngress._call(ingress, _Req("POISON"), "completions"))
    assert out.error.code == 422 and "twice" in out.error.message and handle.calls == 2
    out = asyncio.run(OpenAIIngress._call(ingress, _Req("POISON"), "completions"))  # a resend: no replica
    assert out.error.code == 422 and handle.calls == 2
    assert asyncio.run(OpenAIIngress._call(ingress, _Req("other"), "completions")) == "never"


# ---- a relayed answer whose replica goes silent ----------------------------

class _Silent(_Stream):
    """Sends `chunks`, then nothing, ever."""

    async def __anext__(self):
        if self.chunks:
            return self.chunks.pop(0)
        await asyncio.sleep(3600)


def _relay(stream, idle_s, sse=True):
    ingress = _Ingress()
    flight = _Flight(ingress, "m", "LLM:m@n1")

    async def run():
        return [c async for c in OpenAIIngress._relay(ingress, stream, flight, idle_s, sse=sse)]

    try:
        return asyncio.run(asyncio.wait_for(run(), 10)), ingress
    except Exception as exc:
        return exc, ingress


def test_a_stream_whose_replica_goes_silent_ends_with_vllms_error_event():
    stream = _Silent([b"data: 1\n\n"])
    out, ingress = _relay(stream, idle_s=0.05)
    assert out[0] == b"data: 1\n\n" and out[1].endswith(b"data: [DONE]\n\n")
    error = json.loads(out[1].split(b"\n\n")[0][len(b"data: "):])["error"]
    assert error["code"] == 504 and "retry.idle_timeout_s" in error["message"]
    assert ingress.inflight == {("m", "LLM:m@n1"): 0} and stream.cancelled
    out, ingress = _relay(_Silent([b'{"id": ']), idle_s=0.05, sse=False)  # not a stream: cut off, an error
    assert not isinstance(out, list) and ingress.inflight == {("m", "LLM:m@n1"): 0}
    out, _ = _relay(_Stream([b"a", b"b"]), idle_s=0.05)  # a stream that ends is untouched
    assert out == [b"a", b"b"]


def test_a_python_stream_whose_replica_goes_silent_ends_with_vllms_error_line():
    handle = _PyHandle(_Silent(["data: 1\n\n"]))
    ingress = _python_ingress({"LLM:m@n1": handle}, [route(1, 1)], idle_timeout_s=0.05)

    async def read():
        return [line async for line in OpenAIIngress._call_stream(ingress, _Req(), "completions_stream")]

    lines = asyncio.run(asyncio.wait_for(read(), 10))
    assert lines[0] == "data: 1\n\n" and json.loads(lines[1][len("data: "):])["error"]["code"] == 504
    assert ingress.inflight == {("m", "LLM:m@n1"): 0}
