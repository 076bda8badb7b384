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
    later = s.snapshot(30.0)  # the short request left the 20 s window
    assert (later.recent_requests, later.recent_prompt_tokens, later.recent_output_tokens) == (1, 1500.0, 64.0)
    assert s.snapshot(60.0).recent_requests == 0 and s.snapshot(60.0).recent_prompt_tokens == 0.0
