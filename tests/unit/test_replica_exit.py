"""A replica whose engine died ends its own process (Serve then routes around it and replaces it)."""

import asyncio
from types import SimpleNamespace

from deployments import replica as mod


def test_a_replica_whose_engine_died_ends_its_own_process_and_not_before(monkeypatch):
    ended = []
    monkeypatch.setattr(mod, "_end_process", lambda: ended.append(True))
    monkeypatch.setattr(mod, "ENGINE_WATCH_S", 0.01)
    monkeypatch.setattr(mod, "DEAD_ENGINE_EXIT_GRACE_S", 0.05)
    fake = SimpleNamespace(engine=SimpleNamespace(errored=False), spec=SimpleNamespace(served_name="m"))

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
