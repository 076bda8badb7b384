"""bench/repack.py's scenario, derived from the profile before anything starts, and its verdict."""

from __future__ import annotations

import pytest

from advisor.planner import DeviceSpec, PlannerConfig, evaluate_shape
from advisor.profiler import WorkloadShape
from bench.repack import LONG, OUTPUT, SHORT, ScenarioError, Shift, ShiftResult, plan_scenario, shift_failure
from tests.factories import make_profile

PROFILE = make_profile().model_copy(update={"cores": 2})


def fits(profile, memory, prompt, n):
    ev = evaluate_shape(profile, DeviceSpec(kind="cpu", name="d", memory_bytes=memory, cores=2),
                        WorkloadShape(prompt_tokens=prompt, output_tokens=OUTPUT), PlannerConfig())
    return ev.option(n).fits


def test_the_memory_makes_two_replicas_fit_short_prompts_and_only_one_long_ones():
    s = plan_scenario(PROFILE, cores=2)
    assert fits(PROFILE, s.device_memory_bytes, SHORT, 2) and fits(PROFILE, s.device_memory_bytes, 600, 2)
    assert not fits(PROFILE, s.device_memory_bytes, LONG, 2) and fits(PROFILE, s.device_memory_bytes, LONG, 1)


def test_a_profile_where_n_cannot_move_is_refused_with_the_numbers():
    # weights so large next to the KV that 1500-token prompts barely grow a replica: no memory moves N
    heavy = PROFILE.model_copy(update={"weight_bytes": 40 << 30, "kv_bytes_per_token": 16})
    with pytest.raises(ScenarioError, match=r"no memory where N moves: per replica .* GiB at 600-token prompts"):
        plan_scenario(heavy, cores=2)


def test_one_core_cannot_hold_two_replicas_and_says_so():
    with pytest.raises(ScenarioError, match="does not see the shift"):
        plan_scenario(PROFILE, cores=1)


def result(**fields) -> ShiftResult:
    base = {"failed_requests": 0, "ok_requests": 40, "repack_seconds": 50.0, "switch_to_decision_s": 9.0,
            "tokens_per_s_before": 10.0, "tokens_per_s_after": 5.0, "from": "alpha@n2", "to": "alpha@n1",
            "predicted_gain": None, "decisions": [], "errors": [], "device_memory_bytes": 1}
    return ShiftResult.model_validate({**base, **fields})


def test_a_run_without_a_repack_is_a_failure_that_says_what_the_policy_did():
    no_repack = result(**{"from": None, "to": None, "repack_seconds": None, "decisions": [
        {"model": "alpha", "action": "scale", "reason": "load 6 requests needs 1 replicas"}]})
    assert "no re-pack started within 480 s" in shift_failure(no_repack, Shift())
    assert "load 6 requests" in shift_failure(no_repack, Shift())


@pytest.mark.parametrize("fields, says", [
    ({"repack_seconds": None}, "started but did not finish"),
    ({"from": "alpha@n1", "to": "alpha@n2"}, "not alpha@n2 -> alpha@n1"),
    ({"failed_requests": 2, "errors": ["HTTP 500: x"]}, "2 requests failed"),
    ({"decisions": [{"model": "alpha", "action": "repack_abort", "reason": "no room for N=1"}]}, "aborted: no room"),
])
def test_every_other_outcome_is_a_failure_with_its_reason(fields, says):
    assert says in shift_failure(result(**fields), Shift())


def test_the_scenario_is_a_pass():
    assert shift_failure(result(), Shift()) is None


def test_a_noisy_fit_with_a_negative_kv_term_still_gives_a_scenario():
    """Such a fit crashed the planner (B* = inf -> int(inf)) and with it the benchmark; the planner
    now caps B* with a reason, so the scenario is derived as for any profile."""
    noisy = PROFILE.model_copy(update={"step_model": PROFILE.step_model.model_copy(update={"c_ms": -0.245})})
    scenario = plan_scenario(noisy, cores=2)
    assert scenario.per_replica_short_bytes < scenario.per_replica_long_bytes <= scenario.usable_bytes