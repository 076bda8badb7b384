from cluster.policy import Route
from deployments.ingress import choose_variant


def route(n, running, accepting=True, b=32):
    return Route(n=n, deployment=f"LLM:m@n{n}", accepting=accepting, running=running, max_num_seqs=b)


def test_requests_go_to_the_accepting_variant_with_the_most_free_capacity():
    routes = [route(1, 1, b=64), route(2, 2, b=32)]
    assert choose_variant(routes, {1: 0, 2: 0}) == 1  # equal capacity 64: the smaller N wins the tie
    assert choose_variant(routes, {1: 10, 2: 0}) == 2
    assert choose_variant(routes, {1: 10, 2: 60}) == 1


def test_a_draining_variant_gets_nothing_while_another_can_take_the_request():
    routes = [route(1, 1), route(2, 2, accepting=False)]
    assert all(choose_variant(routes, {1: k, 2: 0}) == 1 for k in (0, 100))


def test_variants_without_running_replicas_are_the_last_resort():
    warming = [route(1, 0), route(2, 1, accepting=False)]
    assert choose_variant(warming, {}) == 2  # a draining replica that runs beats one that does not exist yet
    assert choose_variant([route(1, 0), route(2, 0, accepting=False)], {}) == 1
    assert choose_variant([], {}) is None
