"""The fuzzing test's body hook keeps generation short without hiding validation."""

from bench.schemathesis_hooks import MAX_NEW_TOKENS, cap_budgets


def test_a_missing_or_null_budget_is_set_and_a_large_one_capped():
    assert cap_budgets({"prompt": "x"})["max_tokens"] == MAX_NEW_TOKENS
    out = cap_budgets({"max_tokens": None, "max_completion_tokens": 10_000, "n": 50, "min_tokens": 9})
    assert out == {"max_tokens": MAX_NEW_TOKENS, "max_completion_tokens": MAX_NEW_TOKENS, "n": 2,
                   "min_tokens": MAX_NEW_TOKENS}


def test_a_budget_of_the_wrong_type_or_a_small_one_is_left_as_generated():
    body = {"max_tokens": "many", "max_completion_tokens": 2, "n": True, "best_of": 1.5}
    assert cap_budgets(body) == body
    assert cap_budgets([1, 2]) == [1, 2]
