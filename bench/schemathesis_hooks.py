"""schemathesis hooks for the fuzzing runs (loaded through SCHEMATHESIS_HOOKS): the e2e test, bench/fuzz_vs_vllm.py.

The fuzzer is there to find answers >= 500, not to time generation: a generated body that leaves
`max_tokens` out makes vLLM generate up to `max_model_len` (minutes per request on 2 CPU cores,
past any request timeout). On the completion endpoints every integer token budget is capped at a
few tokens and a missing or null one is set; a budget of another type (a string, a float) is left
as generated, so validation is still exercised.
"""

from __future__ import annotations

import schemathesis

MAX_NEW_TOKENS = 4
BUDGETS = ("max_tokens", "max_completion_tokens")
CAPPED = {"min_tokens": MAX_NEW_TOKENS, "n": 2, "best_of": 2}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cap_budgets(body):
    """The body with its token budgets (and the fan-out that multiplies them) kept small."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in BUDGETS:
        value = body.get(key)
        if value is None or (_is_int(value) and value > MAX_NEW_TOKENS):
            body[key] = MAX_NEW_TOKENS
    for key, cap in CAPPED.items():
        if _is_int(body.get(key)) and body[key] > cap:
            body[key] = cap
    return body


@schemathesis.hook
def map_body(context, body):
    path = context.operation.path if context.operation is not None else ""
    return cap_budgets(body) if path.endswith("/completions") else body
