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
