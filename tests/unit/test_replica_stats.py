import pytest

from deployments.replica_stats import ReplicaStats


def test_token_rate_counts_only_the_window():
    s = ReplicaStats(rate_window_s=10)
    s.on_tokens(0.0, "a", 50, 60)
    s.on_tokens(5.0, "a", 30, 90)
    assert s.snapshot(9.0).tokens_per_s == pytest.approx(8.0)
    assert s.snapshot(12.0).tokens_per_s == pytest.approx(3.0)
    assert s.snapshot(30.0).tokens_per_s == 0.0


def test_mean_context_follows_ongoing_requests():
    s = ReplicaStats()
    s.on_start("a", 100)
    s.on_start("b", 300)
    s.on_tokens(1.0, "a", 10, 110)
    snap = s.snapshot(1.0)
    assert snap.ongoing_requests == 2 and snap.mean_context_tokens == pytest.approx(205)
    s.on_finish("a")
    s.on_finish("b")
    assert s.snapshot(2.0).ongoing_requests == 0 and s.snapshot(2.0).mean_context_tokens == 0.0


def test_scheduler_numbers_and_preemptions_accumulate():
    s = ReplicaStats()
    s.on_scheduler(running=8, waiting=2, kv_usage=0.25, preempted=1)
    s.on_scheduler(running=9, waiting=0, kv_usage=0.3, preempted=2)
    m = s.snapshot(0.0).as_metrics()
    assert m["running_requests"] == 9 and m["waiting_requests"] == 0
    assert m["kv_usage"] == pytest.approx(0.3) and m["preemptions_total"] == 3


def test_live_shape_is_the_mean_of_requests_finished_in_the_shape_window():
    s = ReplicaStats(rate_window_s=10.0, shape_window_s=20.0)
    s.on_start("short", 100)
    s.on_finish("short", now=1.0, output_tokens=60)
    s.on_start("long", 1500)
    s.on_finish("long", now=15.0, output_tokens=64)
    s.on_start("aborted", 9000)
    s.on_finish("aborted", now=16.0, output_tokens=0)  # nothing generated: not a workload sample
    snap = s.snapshot(16.0)
    assert snap.recent_requests == 2
    assert snap.recent_prompt_tokens == pytest.approx(800.0)
    assert snap.recent_output_tokens == pytest.approx(62.0)
    assert snap.recent_output_tokens_sq == pytest.approx((60**2 + 64**2) / 2)  # the spread of the outputs
    later = s.snapshot(30.0)  # the short request left the 20 s window
    assert (later.recent_requests, later.recent_prompt_tokens, later.recent_output_tokens) == (1, 1500.0, 64.0)
    assert s.snapshot(60.0).recent_requests == 0 and s.snapshot(60.0).recent_prompt_tokens == 0.0


def test_decode_steps_are_averaged_over_the_rate_window():
    s = ReplicaStats(rate_window_s=10)
    s.on_decode_step(1.0, 8, 0.040)
    s.on_decode_step(2.0, 16, 0.060)
    s.on_decode_step(3.0, 0, 0.5)  # decoded nothing: not a step
    snap = s.snapshot(5.0)
    assert (snap.decode_steps, snap.decode_batch) == (2, 12.0) and snap.decode_step_ms == pytest.approx(50.0)
    later = s.snapshot(11.5)  # the first step left the window
    assert (later.decode_steps, later.decode_batch) == (1, 16.0) and later.decode_step_ms == pytest.approx(60.0)
    assert s.snapshot(30.0).decode_steps == 0 and s.snapshot(30.0).decode_step_ms == 0.0


def _iteration(prompt_tokens: int, itls: list[float], first_tokens: int = 0):
    from vllm.v1.metrics.stats import IterationStats, PromptTokenStats

    it = IterationStats()
    it.prompt_token_stats = PromptTokenStats()
    it.prompt_token_stats.total = prompt_tokens
    it.inter_token_latencies_iter = list(itls)
    it.time_to_first_tokens_iter = [0.5] * first_tokens
    return it


def test_only_steps_that_prefilled_nothing_count_as_decode_steps():
    """A step where prompts finished their prefill is far longer than a decode step of the same batch:
    counted, it would make the live step model look slow whenever a wave of requests arrives."""
    from deployments.replica_stats import decode_step

    assert decode_step(_iteration(0, [0.050, 0.052, 0.051])) == (3, 0.051)
    assert decode_step(_iteration(2048, [0.9, 0.9], first_tokens=16)) is None
    assert decode_step(_iteration(0, [0.9], first_tokens=1)) is None
    assert decode_step(_iteration(0, [])) is None and decode_step(None) is None


def test_the_stat_logger_feeds_decode_steps_and_scheduler_numbers():
    from types import SimpleNamespace

    from deployments.replica_stats import stat_logger_factory

    s = ReplicaStats(rate_window_s=10)
    logger = stat_logger_factory(s, clock=lambda: 1.0)(vllm_config=None)
    sched = SimpleNamespace(num_running_reqs=4, num_waiting_reqs=0, kv_cache_usage=0.1)
    logger.record(sched, _iteration(0, [0.04] * 4))
    logger.record(sched, _iteration(512, [0.3] * 2, first_tokens=4))
    snap = s.snapshot(2.0)
    assert (snap.decode_steps, snap.decode_batch, snap.running_requests) == (1, 4.0, 4)
    assert snap.decode_step_ms == pytest.approx(40.0)


def test_every_snapshot_field_has_its_gauge():
    """The replica publishes every snapshot field as a gauge: one without a gauge stopped the
    publishing task at its first round, and every plateau gauge with it."""
    from deployments.replica import _GAUGES
    from deployments.replica_stats import ReplicaStatsSnapshot

    assert set(_GAUGES) == set(ReplicaStatsSnapshot.model_fields)



# ---- a stalled engine --------------------------------------------------------------------------

class StoppableEngine:
    """vLLM's AsyncLLM as the replica sees it: `generate` yields what `step` hands a request (one
    token each), and raises vLLM's `EngineGenerateError` from whatever `output_processor.
    propagate_error` puts in its queue (what AsyncLLM does). An engine nobody calls `step` on is
    a stopped EngineCore process (SIGSTOP): no outputs, no stat-logger calls."""

    def __init__(self, stats: ReplicaStats, clock):
        self.errored = False
        self.stats, self.clock = stats, clock
        self.queues: dict = {}
        from types import SimpleNamespace

        self.output_processor = SimpleNamespace(propagate_error=self._propagate)

    def _propagate(self, exc):
        for q in self.queues.values():
            q.put_nowait(exc)

    async def generate(self, prompt, sampling_params, request_id):
        import asyncio

        from vllm.v1.engine.exceptions import EngineGenerateError

        q = self.queues[request_id] = asyncio.Queue()
        try:
            while True:
                out = await q.get()
                if isinstance(out, Exception):
                    raise EngineGenerateError() from out
                yield out
        finally:
            del self.queues[request_id]

    def shutdown(self):
        pass

    def step(self):
        """One engine step: a token for every request, then the stat logger's call."""
        from types import SimpleNamespace

        for q in self.queues.values():
            q.put_nowait(SimpleNamespace(prompt_token_ids=[1, 2, 3], finished=False,
                                         outputs=[SimpleNamespace(index=0, token_ids=[7])]))
        self.stats.on_step(self.clock(), busy=bool(self.queues))


def _delta():
    from types import SimpleNamespace

    from vllm.sampling_params import RequestOutputKind

    return SimpleNamespace(output_kind=RequestOutputKind.DELTA)


def test_a_stall_is_requests_waiting_and_no_engine_step_for_the_limit():
    from deployments.replica_stats import stall_verdict

    assert stall_verdict(1000.0, 10.0, 0, None, 60) is None  # idle: nothing waits, however long since a step
    assert stall_verdict(1000.0, 10.0, 2, 990.0, 60) is None  # idle for long, then requests came 10 s ago
    assert stall_verdict(1000.0, 980.0, 2, 900.0, 60) is None  # it stepped 20 s ago
    verdict = stall_verdict(1000.0, 930.0, 2, 900.0, 60)
    assert verdict is not None and "no step for 70 s" in verdict and "2 request(s)" in verdict
    assert stall_verdict(1000.0, None, 1, 939.0, 60) is not None  # never a step since the request came
    assert stall_verdict(1000.0, None, 1, 941.0, 60) is None


def test_the_stall_limit_is_the_floor_or_ten_times_the_longest_step():
    s = ReplicaStats()
    s.on_step(0.0, busy=True)
    s.on_step(3.0, busy=False)  # a 3 s step (a long prefill) that left the engine idle
    s.on_step(500.0, busy=True)  # 497 s after an idle engine's step: idle time, no step's duration
    s.on_step(500.1, busy=True)
    s.wait_begins(500.1)
    assert s.stall(559.0, floor_s=60.0) is None  # 10 x 3 s is under the 60 s floor
    assert s.stall(561.0, floor_s=60.0) is not None

    slow = ReplicaStats()  # a big model on a slow device: 9 s steps
    slow.on_step(0.0, busy=True)
    slow.on_step(9.0, busy=True)
    slow.wait_begins(9.0)
    assert slow.stall(95.0, floor_s=60.0) is None  # 86 s quiet, limit 90 s
    assert "stall limit 90 s" in slow.stall(100.0, floor_s=60.0)


def test_the_stat_logger_marks_each_engine_step():
    from types import SimpleNamespace

    from deployments.replica_stats import stat_logger_factory

    now = [1.0]
    s = ReplicaStats()
    logger = stat_logger_factory(s, clock=lambda: now[0])(vllm_config=None)
    logger.record(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1), None)
    now[0] = 6.0
    logger.record(SimpleNamespace(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0), None)
    s.wait_begins(6.0)
    assert s.stall(55.0, floor_s=5.0) is None  # 49 s since the last step: the limit is 10 x the 5 s step
    assert "stall limit 50 s" in s.stall(56.5, floor_s=5.0)


def test_only_requests_waiting_for_the_engine_count_never_an_idle_engine_or_a_slow_client():
    """A request whose client reads slowly holds nothing of the engine: the engine, done or idle,
    makes no step and must not look stalled. One that waits for the engine's output does count."""
    import asyncio

    from deployments.replica_stats import track_requests

    now = [0.0]
    s = ReplicaStats()
    engine = StoppableEngine(s, lambda: now[0])
    track_requests(engine, s, clock=lambda: now[0])

    async def run():
        assert s.stall(now[0], 60.0) is None
        now[0] = 5000.0
        assert s.stall(now[0], 60.0) is None  # idle for long: nothing waits
        slow = engine.generate("p", _delta(), "slow")
        first = asyncio.ensure_future(anext(slow))
        await asyncio.sleep(0)
        engine.step()
        await first  # its client has one token and reads no further: the wrapper sits at its yield
        now[0] = 9000.0
        assert s.stall(now[0], 60.0) is None  # no step for an hour, yet nothing waits for the engine
        waiting = engine.generate("p", _delta(), "waiting")
        task = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0)
        now[0] = 9059.0
        assert s.stall(now[0], 60.0) is None
        now[0] = 9061.0
        assert "1 request(s)" in s.stall(now[0], 60.0)  # this one waits: the stopped engine is stalled
        engine.step()
        await task
        assert s.stall(now[0], 60.0) is None  # a step, and the request has its token
        await slow.aclose()
        await waiting.aclose()

    asyncio.run(run())


def test_a_stalled_engines_requests_end_with_the_verdict_as_vllms_retryable_503():
    """Once the replica declared the stall and put the error into vLLM's request queues, a waiting
    request fails with the verdict (vLLM's serving layer makes it its error body, or its SSE error
    event and `data: [DONE]` mid-stream) and a new one fails at once."""
    import asyncio

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import GenerationError

    from deployments.replica_stats import stalled_error, track_requests

    s = ReplicaStats()
    engine = StoppableEngine(s, lambda: 0.0)
    track_requests(engine, s, clock=lambda: 0.0)
    verdict = "the vLLM engine made no step for 61 s while 1 request(s) waited for it (stall limit 60 s)"

    async def run():
        stream = engine.generate("p", _delta(), "a")
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        s.stalled = verdict
        engine.output_processor.propagate_error(stalled_error(verdict))
        with pytest.raises(GenerationError) as failed:
            await asyncio.wait_for(task, 2)
        with pytest.raises(GenerationError) as refused:
            await anext(engine.generate("p", _delta(), "b"))
        return failed.value, refused.value

    failed, refused = asyncio.run(run())
    for exc in (failed, refused):
        assert exc.status_code == 503 and verdict in str(exc)
        err = create_error_response(exc).error
        assert (err.code, err.type) == (503, "ServiceUnavailableError") and verdict in err.message
