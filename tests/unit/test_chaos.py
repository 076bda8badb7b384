"""The fault-injection benchmark's bookkeeping: which requests a fault cost, and which targets it missed."""

from bench.chaos import HANG_S, FaultResult, Outcome, RequestCounts, count_requests, leftover_engines, problems_of


def outcome(start, end, ok=True, error=""):
    return Outcome(start=start, end=end, ok=ok, tokens=64 if ok else 3, error=error)


def test_a_request_belongs_to_the_kill_it_was_in_flight_at_or_ended_after():
    outcomes = [
        outcome(5, 9),                         # ended before the kill: warm-up, nobody's
        outcome(10, 30),                       # in flight at the kill (20), succeeded (retried)
        outcome(12, 21, ok=False, error="x"),  # in flight at the kill, failed
        outcome(25, 25 + HANG_S, ok=False),    # sent after the kill, hung: ends after the next kill, yet it
        outcome(26, 40),                       # ... belongs to the next fault (in flight there)
        outcome(45, 70, ok=False),             # in flight at the next kill (60): the next fault's
    ]
    q = count_requests(outcomes, kill_at=20, next_kill=60)
    assert (q.sent, q.succeeded, q.failed) == (3, 2, 1)
    assert (q.failed_in_flight, q.failed_sent_after_kill, q.hung) == (1, 0, 0)
    assert q.in_flight_at_kill == 2 and q.errors == ["x"]
    last = count_requests(outcomes, kill_at=60)  # the last fault: everything that ended after its kill
    assert (last.sent, last.failed, last.failed_in_flight, last.failed_sent_after_kill, last.hung) == (2, 2, 2, 0, 1)


def test_an_engine_whose_parent_is_no_live_replica_is_left_over():
    assert leftover_engines({101: 50, 102: 1, 103: 60}, replica_pids={50, 60}) == [102]
    assert leftover_engines({}, replica_pids={50}) == []


def result(**kw):
    base = dict(fault="replica", target="r (pid 1)", in_flight_on_target=3, seconds_to_full_capacity=70.0,
                leftover_engine_pids=[],
                requests=RequestCounts(sent=20, succeeded=18, failed=2, failed_in_flight=2, failed_sent_after_kill=0,
                                       hung=0, in_flight_at_kill=6))
    return FaultResult(**{**base, **kw})


def test_a_fault_that_cost_only_requests_on_the_killed_process_meets_every_target():
    assert problems_of(result()) == []


def test_each_missed_target_is_named():
    bad = result(in_flight_on_target=1, seconds_to_full_capacity=None, leftover_engine_pids=[7],
                 requests=RequestCounts(sent=20, succeeded=15, failed=5, failed_in_flight=2, failed_sent_after_kill=3,
                                        hung=1, in_flight_at_kill=6))
    problems = " | ".join(problems_of(bad))
    assert "2 requests in flight failed, more than the 1" in problems
    assert "3 requests sent after the kill failed" in problems
    assert "1 requests hung" in problems and "[7]" in problems and "not back to full capacity" in problems
    assert "over 2 minutes" in " ".join(problems_of(result(seconds_to_full_capacity=130.0)))


def test_when_the_killed_process_is_no_replica_no_request_may_fail():
    actor = result(fault="status_board", in_flight_on_target=None)
    assert "2 requests in flight failed, more than the 0" in " ".join(problems_of(actor))
    clean = RequestCounts(sent=20, succeeded=20, failed=0, failed_in_flight=0, failed_sent_after_kill=0, hung=0,
                          in_flight_at_kill=6)
    assert problems_of(result(fault="status_board", in_flight_on_target=None, requests=clean)) == []


def test_a_killed_replica_is_back_only_once_a_new_one_runs_in_its_place():
    from bench.chaos import Kill, ServeView, recovered

    kill = Kill(pid=9, label="r1", replica="S::app#LLM:m@n2#r1", before={"LLM:m": 2, "OpenAIIngress": 1},
                replicas_before=["S::app#LLM:m@n2#r1", "S::app#LLM:m@n2#r2"])
    full = ServeView(healthy=True, running={"LLM:m": 2, "OpenAIIngress": 1})
    # Serve still counts the dead one as running, its name is gone: not back
    assert not recovered(kill, full, {"S::app#LLM:m@n2#r2"}, None)
    # the replacement exists but does not run yet
    starting = ServeView(healthy=False, running={"LLM:m": 1, "OpenAIIngress": 1})
    assert not recovered(kill, starting, {"S::app#LLM:m@n2#r2", "S::app#LLM:m@n2#r3"}, None)
    assert not recovered(kill, None, {"S::app#LLM:m@n2#r2", "S::app#LLM:m@n2#r3"}, None)  # no controller
    unhealthy = full.model_copy(update={"healthy": False})
    assert not recovered(kill, unhealthy, {"S::app#LLM:m@n2#r2", "S::app#LLM:m@n2#r3"}, None)
    assert recovered(kill, full, {"S::app#LLM:m@n2#r2", "S::app#LLM:m@n2#r3"}, None)
    # in a re-pack the new variant may take over: no replacement needed once the counts are full
    repack = kill.model_copy(update={"replacement_expected": False})
    assert recovered(repack, full, {"S::app#LLM:m@n2#r2"}, None)


def test_a_killed_actor_is_back_when_it_answers_from_a_new_process():
    from bench.chaos import Kill, ServeView, recovered

    kill = Kill(pid=40, label="board", actor=("plateau-status", "plateau"), before={"LLM:m": 2})
    view = ServeView(healthy=True, running={"LLM:m": 2})
    assert not recovered(kill, view, set(), None)
    assert not recovered(kill, view, set(), 40)
    assert recovered(kill, view, set(), 41)
