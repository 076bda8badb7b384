"""bench/hops.py without Ray: py-spy's collapsed stacks -> a process's hottest functions."""

from bench.hops import top_functions


def test_the_hottest_functions_are_ranked_by_their_own_samples_not_their_callees():
    raw = "\n".join([
        "main (a.py:1);loop (a.py:5);relay (ingress.py:9) 30",
        "main (a.py:1);loop (a.py:5);pickle (p.py:2) 60",
        "main (a.py:1);loop (a.py:5) 10",
        "garbage line",
        "",
    ])
    samples, top = top_functions(raw, top=2)
    assert samples == 100
    assert top == [("pickle (p.py:2)", 0.6), ("relay (ingress.py:9)", 0.3)]  # main/loop are callers only
    assert top_functions("") == (0, [])
