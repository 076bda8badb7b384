"""Which replica the router pins a request to, from the replicas' reports and its own pins."""

import json

from cluster.policy import Route
from cluster.routing import Assignments, ReplicaReport, ServedModel, choose_replica, model_of
from deployments.router import pick

NOW = 1000.0


def report(rid, ongoing=0, received=0, deployment="LLM:m@n2", model="m", b=32, at=NOW, stopping=False):
    return ReplicaReport(replica_id=rid, model=model, deployment=deployment, max_num_seqs=b, ongoing=ongoing,
                         received=received, stopping=stopping, at=at)


def route(n, accepting=True, running=2, b=32):
    return Route(n=n, deployment=f"LLM:m@n{n}", accepting=accepting, running=running, max_num_seqs=b)


def test_a_request_goes_to_the_replica_with_the_most_free_room():
    reports = [report("a", ongoing=20), report("b", ongoing=5), report("c", ongoing=5, b=16)]
    assert choose_replica("m", [route(2)], reports, {}, NOW).replica_id == "b"  # 27 free, against 12 and 11
    # what this router pinned since the last reports counts as held
    assert choose_replica("m", [route(2)], reports, {"b": 20}, NOW).replica_id == "a"


def test_only_fresh_live_replicas_of_accepting_variants_of_the_model_are_chosen():
    routes = [route(1, accepting=False), route(2)]
    assert choose_replica("m", routes, [report("old", deployment="LLM:m@n1")], {}, NOW) is None  # draining variant
    assert choose_replica("m", routes, [report("gone", at=NOW - 30)], {}, NOW) is None  # stopped reporting
    assert choose_replica("m", routes, [report("stop", stopping=True)], {}, NOW) is None
    assert choose_replica("m", routes, [report("other", model="x")], {}, NOW) is None
    ingress = ReplicaReport(replica_id="i", role="ingress", at=NOW)
    assert choose_replica("m", routes, [ingress], {}, NOW) is None
    # a full replica still takes the request (its engine queues it) when it is the only one
    assert choose_replica("m", routes, [report("full", ongoing=40)], {}, NOW).replica_id == "full"


def test_pins_count_until_the_replica_reports_them_and_lost_ones_expire():
    book = Assignments(ttl_s=5.0)
    book.observe(report("a", received=10))
    book.sent("a", NOW)
    book.sent("a", NOW + 1)
    book.sent("a", NOW + 2)
    assert book.pending("a", NOW + 2) == 3
    book.observe(report("a", received=12))  # two of them arrived (they are in `ongoing` now)
    assert book.pending("a", NOW + 2) == 1
    book.observe(report("a", received=12))  # the same report read again changes nothing
    assert book.pending("a", NOW + 2) == 1
    assert book.pending("a", NOW + 8) == 0  # never arrived: forgotten after the TTL
    book.sent("b", NOW)
    book.forget_except({"a"})
    assert book.pending("b", NOW) == 0


def test_a_burst_between_two_reports_spreads_over_the_replicas():
    book = Assignments()
    reports = [report("a"), report("b")]
    chosen = []
    for _ in range(10):
        r = pick(b'{"model": "m"}', False, {"m": ServedModel(name="m", max_model_len=None, replicas=2)}, "m",
                 {"m": [route(2)]}, reports, book, NOW)
        book.sent(r.replica_id, NOW)
        chosen.append(r.replica_id)
    assert chosen.count("a") == chosen.count("b") == 5


def test_the_router_sends_what_it_cannot_pin_the_python_way():
    models = {"m": ServedModel(name="m", max_model_len=None, replicas=2),
              "x": ServedModel(name="x", max_model_len=None, replicas=1)}
    routes = {"m": [route(2)], "x": [Route(n=1, deployment="LLM:x@n1", accepting=True, running=1, max_num_seqs=8)]}
    reports = [report("a"), report("xa", model="x", deployment="LLM:x@n1")]

    def chosen(body, truncated=False, served=models):
        r = pick(body, truncated, served, "m", routes, reports, Assignments(), NOW)
        return r.replica_id if r else None

    assert chosen(b'{"model": "x", "prompt": "hi"}') == "xa"
    assert chosen(b'{"prompt": "hi"}') == "a"  # no model: the default one, as the ingress sends it
    assert chosen(b'{"model": "nope"}') is None  # the ingress answers its 404
    assert chosen(b"") is None  # HAProxy forwarded no body and two models are served
    assert chosen(b'{"model": "x", "pro', truncated=True) is None
    one = {"m": models["m"]}
    assert chosen(b"", served=one) == "a"  # one model: its replica reads the whole body itself
    assert chosen(b'{"model": "m", "pro', truncated=True, served=one) == "a"


def test_model_of_refuses_what_is_not_a_json_object_naming_a_model():
    assert model_of(b'{"model": "m"}') == "m"
    assert model_of(b'{"model": 3}') is None
    assert model_of(b"[1, 2]") is None
    assert model_of(b"\xff") is None
    assert model_of(b"[" * 100000) is None  # deeper than the parser allows: no 500 from a RecursionError


# ---- request body limits: what the router, the ingress and a replica's front refuse --------------

def test_nesting_is_counted_outside_strings_up_to_the_limit():
    from cluster.routing import json_nesting_exceeds

    assert not json_nesting_exceeds(b"[" * 16 + b"]" * 16, 16)
    assert json_nesting_exceeds(b"[" * 17 + b"]" * 17, 16)
    assert json_nesting_exceeds(b'{"a":' * 17 + b"1" + b"}" * 17, 16)
    assert json_nesting_exceeds(b"[" * 100000, 16)  # deeper than Python's parser allows
    # brackets inside strings (escaped quotes included) are text, not nesting
    text = json.dumps({"model": "m", "prompt": "[{" * 500 + '\\"[[' + '"' * 3}).encode()
    assert not json_nesting_exceeds(text, 16)
    wide = json.dumps({"model": "m", "prompt": [[1, 2]] * 5000}).encode()  # many lists, depth 3
    assert not json_nesting_exceeds(wide, 16)
    # counted in pieces of 2**20 brackets: the depth carries over from one piece to the next
    assert json_nesting_exceeds(b"[" * 10 + b"[]" * 2**19 + b"[" * 7, 16)
    assert not json_nesting_exceeds(b"[" * 10 + b"[]" * 2**19 + b"[" * 6, 16)


def test_a_body_over_the_size_is_refused_with_413_and_one_nested_too_deep_with_400():
    from cluster.routing import RequestLimits, body_refusal

    limits = RequestLimits(max_body_bytes=2048, max_json_depth=16)
    assert body_refusal(b'{"model": "m"}', limits, parsed=True) is None
    big = body_refusal(b"x" * 2049, limits, parsed=False)
    assert big.status == 413 and "2048" in big.message and "limits.max_body_bytes" in big.message
    deep = body_refusal(b"[" * 17 + b"]" * 17, limits, parsed=True)
    assert deep.status == 400 and deep.err_type == "BadRequestError" and "limits.max_json_depth" in deep.message
    assert body_refusal(b"[" * 17 + b"]" * 17, limits, parsed=False) is None  # a body nobody parses


def test_the_router_leaves_a_body_too_deep_or_too_big_to_the_ingress_which_answers_it():
    from cluster.routing import RequestLimits

    models = {"m": ServedModel(name="m", max_model_len=None, replicas=2)}
    limits = RequestLimits(max_body_bytes=4096, max_json_depth=16)

    def chosen(body, truncated=False):
        r = pick(body, truncated, models, "m", {"m": [route(2)]}, [report("a")], Assignments(), NOW, limits)
        return r.replica_id if r else None

    assert chosen(b'{"model": "m", "prompt": "hi"}') == "a"
    assert chosen(b'{"model": "m", "prompt": ' + b"[" * 17 + b"]" * 17 + b"}") is None
    assert chosen(b"[" * 100000) is None  # no RecursionError in the router either
    assert chosen(b'{"model": "m", "prompt": "' + b"x" * 5000 + b'"}') is None
    # a cut body: only its size tells (its nesting is for the replica's front, which reads it whole)
    assert chosen(b'{"model": "m", "prompt": "' + b"[" * 100, truncated=True) == "a"
    assert chosen(b'{"model": "m", "prompt": "' + b"x" * 5000, truncated=True) is None
