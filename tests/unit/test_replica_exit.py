"""A replica whose engine died ends its own process (Serve then routes around it and replaces it)."""

import asyncio
from types import SimpleNamespace

from deployments import replica as mod
from deployments.replica_stats import ReplicaStats


def test_a_replica_whose_engine_died_ends_its_own_process_and_not_before(monkeypatch):
    ended = []
    monkeypatch.setattr(mod, "_end_process", lambda: ended.append(True))
    monkeypatch.setattr(mod, "ENGINE_WATCH_S", 0.01)
    monkeypatch.setattr(mod, "DEAD_ENGINE_EXIT_GRACE_S", 0.05)
    fake = SimpleNamespace(engine=SimpleNamespace(errored=False), spec=SimpleNamespace(served_name="m"),
                           _stopping=False, stats=ReplicaStats(), _engine_stalled=lambda now: False,
                           _fail_engine_requests=lambda: None)

    async def run():
        watch = asyncio.ensure_future(mod.LLMReplica._exit_when_engine_dies(fake))
        await asyncio.sleep(0.1)
        assert not ended and not watch.done()  # a live engine: the replica stays
        fake.engine.errored = True
        await asyncio.sleep(0.02)
        assert not ended  # the grace: in-flight streams send their error events first
        await asyncio.wait_for(watch, 2)

    asyncio.run(run())
    assert ended == [True]


def test_an_engine_stopped_by_serves_graceful_stop_does_not_end_the_process(monkeypatch):
    """Serve stops a replica (scale-down, re-pack drain, `serve shutdown`) by calling its `__del__`,
    which shuts the engine down: the watch lets Serve finish its stop instead of logging an engine
    death and exiting with status 1."""
    ended = []
    monkeypatch.setattr(mod, "_end_process", lambda: ended.append(True))
    monkeypatch.setattr(mod, "ENGINE_WATCH_S", 0.01)
    monkeypatch.setattr(mod, "DEAD_ENGINE_EXIT_GRACE_S", 0.01)

    class Engine:  # vLLM's AsyncLLM: `errored` once shut down
        errored = False

        def shutdown(self):
            self.errored = True

    replica = mod.LLMReplica.__new__(mod.LLMReplica)  # the deployment class itself, without an engine start
    replica._stopping, replica.engine, replica.stats = False, Engine(), ReplicaStats()
    replica.spec = SimpleNamespace(served_name="m", stall_timeout_s=60)

    async def run():
        watch = asyncio.ensure_future(replica._exit_when_engine_dies())
        await asyncio.sleep(0.05)
        await replica.__del__()  # what Serve's graceful stop awaits (`call_destructor`)
        await asyncio.wait_for(watch, 2)

    asyncio.run(run())
    assert replica.engine.errored and ended == []


def test_a_python_call_on_a_dead_engine_is_refused_as_engine_dead_so_the_ingress_sends_it_elsewhere():
    import pytest

    from deployments.engine import EngineDead

    class Serving:
        def __init__(self, engine, answer):
            self.engine, self.answer = engine, answer

        async def create_completion(self, request, raw_request=None):
            if isinstance(self.answer, Exception):
                self.engine.errored = True  # the engine dies while serving the request
                raise self.answer
            return self.answer

    def replica(errored, answer):
        engine = SimpleNamespace(errored=errored)
        return SimpleNamespace(engine=engine, spec=SimpleNamespace(served_name="m"),
                               _engine_gone=lambda: engine.errored,
                               app=SimpleNamespace(state=SimpleNamespace(
                                   openai_serving_completion=Serving(engine, answer))))

    call = mod.LLMReplica._serve_python
    assert asyncio.run(call(replica(False, "ok"), "openai_serving_completion", "create_completion", None)) == "ok"
    with pytest.raises(EngineDead):  # dead before the call: not even tried
        asyncio.run(call(replica(True, "ok"), "openai_serving_completion", "create_completion", None))
    with pytest.raises(EngineDead):  # died during it: vLLM's EngineDeadError
        asyncio.run(call(replica(False, RuntimeError("EngineCore died")), "openai_serving_completion",
                         "create_completion", None))
    vllm_500 = SimpleNamespace(error=SimpleNamespace(code=500))
    assert asyncio.run(call(replica(False, vllm_500), "openai_serving_completion", "create_completion", None)) \
        is vllm_500  # a live engine's own 500 is the answer


def test_a_stopping_replica_serves_its_streams_to_the_end_before_its_engine_stops(monkeypatch):
    """Serve's graceful stop counts only the requests its handles sent; those HAProxy sent to the
    replica's own server are the replica's to wait for: the routers hear it stops, its server
    closes once it holds none, and only then the engine stops."""
    monkeypatch.setattr(mod, "FRONT_DRAIN_MIN_S", 0.05)
    events = []

    class Engine:
        errored = False

        def shutdown(self):
            events.append(("engine stopped", front.ongoing))

    class Server:
        async def stop(self, timeout_s):
            events.append(("server closed", front.ongoing))

    class Board:
        def __init__(self):
            self.forget_replica = SimpleNamespace(remote=lambda app, rid: events.append(("forgotten", rid)))

    from deployments.replica_front import ReplicaFront

    front = ReplicaFront(app=None, served_name="m", default_model="m", api_key=None, relay=None,
                         engine_dead=lambda: False)
    front.ongoing = 2  # two streams under way
    monkeypatch.setattr(mod, "find_board", lambda: Board())
    replica = mod.LLMReplica.__new__(mod.LLMReplica)
    replica._stopping, replica.engine, replica.spec = False, Engine(), SimpleNamespace(served_name="m")
    replica.front, replica._front_server = front, Server()
    replica._identity = ("plateau", "LLM:m@n2", "SERVE_REPLICA::plateau#LLM:m@n2#a")

    async def run():
        replica._reporter = asyncio.ensure_future(asyncio.sleep(3600))
        stop = asyncio.ensure_future(replica.__del__())
        await asyncio.sleep(0.1)
        assert front.stopping and not front.healthy() and events == []  # told the routers; still serving
        front.ongoing, front.relaying = 0, 1  # vLLM's streams ended; one handed to the ingress still streams
        await asyncio.sleep(0.3)
        assert events == []
        front.relaying = 0
        await asyncio.wait_for(stop, 5)

    asyncio.run(run())
    assert events == [("server closed", 0), ("forgotten", "SERVE_REPLICA::plateau#LLM:m@n2#a"),
                      ("engine stopped", 0)]


def test_a_failed_drain_still_stops_the_engine(monkeypatch):
    """Whatever goes wrong while the replica's own server drains (an unreachable controller, a board
    that restarts), the engine stops: it holds a device."""
    import pytest

    monkeypatch.setattr(mod, "FRONT_DRAIN_MIN_S", 0.0)
    monkeypatch.setattr(mod, "find_board", lambda: None)  # no board to withdraw from
    stopped = []

    class Server:
        async def stop(self, timeout_s):
            raise RuntimeError("controller unreachable")

    from deployments.replica_front import ReplicaFront

    replica = mod.LLMReplica.__new__(mod.LLMReplica)
    replica._stopping, replica.spec = False, SimpleNamespace(served_name="m")
    replica.engine = SimpleNamespace(errored=False, shutdown=lambda: stopped.append(True))
    replica.front = ReplicaFront(app=None, served_name="m", default_model="m", api_key=None, relay=None,
                                 engine_dead=lambda: False)
    replica._front_server, replica._identity = Server(), ("plateau", "LLM:m@n2", "r")
    async def stop():
        await replica.__del__()  # as Serve's graceful stop awaits it

    with pytest.raises(RuntimeError):
        asyncio.run(stop())
    assert stopped == [True]
    assert replica.__del__() is None and stopped == [True]  # the garbage collector's later call: nothing more


def _stall_replica(limit_s: float):
    """The deployment class over a `StoppableEngine`, its requests tracked as the replica tracks them."""
    import time

    from deployments.replica_stats import track_requests
    from tests.unit.test_replica_stats import StoppableEngine

    replica = mod.LLMReplica.__new__(mod.LLMReplica)
    replica._stopping, replica.stats = False, ReplicaStats()
    replica.spec = SimpleNamespace(served_name="m", stall_timeout_s=limit_s)
    replica.engine = StoppableEngine(replica.stats, time.monotonic)
    track_requests(replica.engine, replica.stats)
    return replica


def test_a_replica_whose_engine_stalled_ends_its_streams_fails_its_health_check_and_exits(monkeypatch):
    """An EngineCore process stopped with SIGSTOP: vLLM notices nothing (no error, no output), so
    without a stall watch the replica stayed healthy and its streams waited for good."""
    import pytest
    from vllm.exceptions import GenerationError

    from deployments.engine import EngineDead
    from tests.unit.test_replica_stats import _delta

    ended = []
    monkeypatch.setattr(mod, "_end_process", lambda: ended.append(True))
    monkeypatch.setattr(mod, "ENGINE_WATCH_S", 0.01)
    monkeypatch.setattr(mod, "DEAD_ENGINE_EXIT_GRACE_S", 0.05)
    replica = _stall_replica(limit_s=0.5)  # over 10x its steps below, so the floor is the limit

    async def run():
        watch = asyncio.ensure_future(replica._exit_when_engine_dies())
        await asyncio.sleep(0.7)  # idle past the limit: nothing waits, no stall
        stream = replica.engine.generate("p", _delta(), "a")
        tokens = 0
        for _ in range(40):  # 0.8 s of a live engine, a step every 0.02 s: no stall either
            nxt = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0.02)
            replica.engine.step()
            await nxt
            tokens += 1
        assert not watch.done() and replica.stats.stalled is None
        await replica.check_health()
        stopped_at = asyncio.get_running_loop().time()  # SIGSTOP: no more steps
        with pytest.raises(GenerationError) as failed:
            await asyncio.wait_for(anext(stream), 5)
        took = asyncio.get_running_loop().time() - stopped_at
        assert 0.5 <= took < 3 and "no step" in str(failed.value) and failed.value.status_code == 503
        with pytest.raises(RuntimeError, match="stalled: the vLLM engine made no step"):
            await replica.check_health()  # Serve replaces it...
        with pytest.raises(EngineDead):  # ...and a Python call that reaches it meanwhile goes elsewhere
            await replica._serve_python("openai_serving_completion", "create_completion", None)
        await asyncio.wait_for(watch, 2)  # ...and it ends its own process, as with a dead engine
        return tokens

    assert asyncio.run(run()) == 40
    assert ended == [True]
