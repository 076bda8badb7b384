from cluster.board import AppPlacement, AppStatus, render_status
from cluster.inventory import Device
from cluster.packing import PackResult, PlacedReplicas
from cluster.policy import Decision, LiveModel, Route

GiB = 1 << 30


def test_status_text_shows_devices_placement_variants_and_decisions():
    placement = AppPlacement(
        app="plateau",
        devices=[Device(name="h/gpu0", node_id="h", kind="cuda", model_name="logical GPU", memory_bytes=8 * GiB,
                        memory_source="declared", cores=2)],
        packing=PackResult(placement={"h/gpu0": [PlacedReplicas(model="LLM:a@n2", replicas=1, share=0.5,
                                                                 memory_bytes=2 * GiB)]},
                           devices_used=1, lower_bound=1, unplaced=[]),
        routes={"a": [Route(n=2, deployment="LLM:a@n2", accepting=True, running=1, max_num_seqs=32)]},
    )
    routes = {"a": [Route(n=1, deployment="LLM:a@n1", accepting=True, running=1, max_num_seqs=32),
                    Route(n=2, deployment="LLM:a@n2", accepting=False, running=0, max_num_seqs=32)]}
    status = AppStatus(
        placement=placement, routes=routes, policy_seen_at=100.0,
        live=[LiveModel(model="a", active_n=1, best_n=1, b_star=47, planned_tokens_per_s=126.0,
                        measured_tokens_per_s=30.0, kv_usage=0.11, replicas={1: 1, 2: 0})],
        decisions=[Decision(at=90.0, model="a", action="repack_done", from_n=2, to_n=1, replicas_from=0,
                            replicas_to=1, reason="N=2 drained", seconds=81.0)],
    )
    text = render_status("plateau", status, now=102.0)
    assert "h/gpu0" in text and "8.0 GiB (declared)" in text
    assert "LLM:a@n2 x1 (share 0.5, 2.00 GiB)" in text
    assert "n1: 1 running  n2: 0 running (not accepting)" in text
    assert "active N=1, best N=1, B*=47" in text and "not enough traffic" in text
    assert "policy last ran: 2 s ago" in text
    assert "repack_done N=2->N=1 replicas 0->1, took 81 s: N=2 drained" in text


def test_status_groups_devices_and_their_start_replicas_by_node_and_device_type():
    def gpu(node, i, device_type, memory):
        return Device(name=f"10.0.0.{node}/gpu{i}", node_id=f"node{node}xxxxxx", node_address=f"10.0.0.{node}",
                      kind="cuda", model_name="logical GPU",
                      memory_bytes=memory, memory_source="node-share", cores=2, device_type=device_type)
    placed = {"10.0.0.1/gpu0": [PlacedReplicas(model="LLM:a@n2", replicas=2, share=1.0, memory_bytes=3 * GiB)],
              "10.0.0.2/gpu1": [PlacedReplicas(model="LLM:b@n1", replicas=1, share=1.0, memory_bytes=7 * GiB)]}
    placement = AppPlacement(app="p", devices=[gpu(1, 0, "A", 4 * GiB), gpu(2, 0, "B", 8 * GiB), gpu(2, 1, "B", 8 * GiB)],
                             packing=PackResult(placement=placed, devices_used=2, lower_bound=2, unplaced=[]), routes={})
    lines = render_status("p", AppStatus(placement=placement)).splitlines()
    start = lines.index("  node 10.0.0.1 (node1xxx), device type A:")
    assert lines[start + 1].split() == ["10.0.0.1/gpu0", "logical", "GPU", "4.0", "GiB", "(node-share):", "LLM:a@n2", "x2",
                                        "(share", "1,", "3.00", "GiB)"]
    assert lines[start + 2] == "  node 10.0.0.2 (node2xxx), device type B:"
    assert lines[start + 3].endswith("(node-share): (empty)") and lines[start + 4].endswith("LLM:b@n1 x1 (share 1, 7.00 GiB)")


# ---- a restarted board gets its placement back; errors before the placement -------

class DictStore:
    def __init__(self):
        self.data = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value


class NoMetrics:
    def record(self, app, live, new_decisions):
        pass


def _placement(app="plateau"):
    return AppPlacement(
        app=app, devices=[], packing=PackResult(placement={}, devices_used=0, lower_bound=0, unplaced=[]),
        routes={"a": [Route(n=1, deployment="LLM:a@n1", accepting=False, running=0, max_num_seqs=32),
                      Route(n=2, deployment="LLM:a@n2", accepting=True, running=1, max_num_seqs=32)]})


def test_a_restarted_board_reads_back_its_placement_and_the_last_published_routes():
    from cluster.board import StatusBoard

    store = DictStore()
    board = StatusBoard(store=store, metrics=NoMetrics())
    board.set_placement(_placement())
    live_routes = {"a": [Route(n=1, deployment="LLM:a@n1", accepting=True, running=1, max_num_seqs=32),
                         Route(n=2, deployment="LLM:a@n2", accepting=False, running=1, max_num_seqs=32)]}
    board.publish("plateau", live_routes, [], [])

    restarted = StatusBoard(store=store, metrics=NoMetrics())
    assert restarted.routes("plateau") == live_routes  # the drain of n2 is not forgotten
    assert restarted.status()["plateau"].placement == _placement()
    later = {"a": [r.model_copy(update={"running": 2}) for r in live_routes["a"]]}
    restarted.publish("plateau", later, [], [])  # and it keeps taking the policy's publishes
    assert restarted.routes("plateau") == later


def test_an_ingress_that_sends_its_placement_again_does_not_reopen_a_draining_variant():
    from cluster.board import StatusBoard

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())
    board.set_placement(_placement())
    draining = {"a": [Route(n=1, deployment="LLM:a@n1", accepting=True, running=1, max_num_seqs=32),
                      Route(n=2, deployment="LLM:a@n2", accepting=False, running=1, max_num_seqs=32)]}
    board.publish("plateau", draining, [], [])
    board.set_placement(_placement())
    assert board.routes("plateau") == draining


def test_policy_errors_before_the_placement_and_the_first_publish_show_in_the_status():
    from cluster.board import StatusBoard

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())
    board.policy_error("plateau", "OverflowError: cannot convert float infinity to integer")
    board.set_placement(_placement())
    status = board.status()["plateau"]
    assert status.policy_errors == 1
    text = render_status("plateau", status, now=0.0)
    assert "policy last ran: never" in text and "errors: 1 (last: OverflowError" in text


def test_ensure_routes_sends_the_placement_again_to_a_board_that_lost_it():
    import asyncio

    from cluster.board import StatusBoard, ensure_routes

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())

    class Handle:  # the actor handle's surface: method.remote(...) returns an awaitable
        def __getattr__(self, name):
            async def call(*args):
                return getattr(board, name)(*args)
            return SimpleNamespace(remote=call)

    from types import SimpleNamespace
    routes = asyncio.run(ensure_routes(Handle(), _placement()))
    assert routes == _placement().routes and board.routes("plateau") == _placement().routes


# ---- the policy's autoscaler request in plateau status ------------------------------

def test_the_policys_last_autoscaler_request_is_shown_and_cleared_when_it_asks_nothing():
    from cluster.autoscaler import MissingDevices, ResourceRequest
    from cluster.board import StatusBoard

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())
    request = ResourceRequest(bundles=[{"GPU": 1.0}] * 3, at=0.0,
                              missing=[MissingDevices(kind="cuda", count=2, memory_bytes=80 * GiB)])
    board.publish("p", {}, [], [], 50, request)
    status = board.status("p")["p"]
    assert status.requested == request
    text = render_status("p", status)
    assert ("for the 3 devices its replica targets use: 2 cuda device(s) of 80.0 GiB beyond the start placement's "
            "devices") in text
    board.publish("p", {}, [], [])  # a redeploy without cluster_autoscaling: no stale request is shown
    assert board.status("p")["p"].requested is None
    assert "the policy last asked" not in render_status("p", board.status("p")["p"])


def test_devices_that_joined_or_left_since_the_deploy_are_shown_from_the_policys_last_reading():
    from cluster.board import StatusBoard
    from cluster.packing import DeviceCapacity

    def gpu(name):
        return Device(name=name, node_id=name[:1], kind="cuda", model_name="logical GPU", memory_bytes=8 * GiB,
                      memory_source="declared", cores=2)

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())
    board.set_placement(AppPlacement(app="p", devices=[gpu("a/gpu0"), gpu("b/gpu0")], routes={},
                                          packing=PackResult(placement={}, devices_used=0, lower_bound=0, unplaced=[])))
    now = [DeviceCapacity(name=n, memory_bytes=8 * GiB) for n in ("a/gpu0", "c/gpu0", "c/gpu1")]
    board.publish("p", {}, [], [], 50, None, now)
    status = board.status("p")["p"]
    assert status.devices == now
    assert ("the policy grows onto the 3 devices the cluster has now: joined since the deploy: c/gpu0, c/gpu1; "
            "left: b/gpu0") in render_status("p", status)
    board.publish("p", {}, [], [], 50, None, now[:1] + [DeviceCapacity(name="b/gpu0", memory_bytes=8 * GiB)])
    assert "grows onto" not in render_status("p", board.status("p")["p"])  # the deploy's devices: nothing to say


def test_the_routers_get_the_routes_and_each_replicas_latest_fresh_report():
    from cluster.board import StatusBoard
    from cluster.routing import ReplicaReport

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())
    routes = {"a": [Route(n=2, deployment="LLM:a@n2", accepting=True, running=2, max_num_seqs=32)]}
    board.publish("plateau", routes, [], [])
    for replica_id, ongoing, at in (("r1", 1, 100.0), ("r2", 1, 100.0), ("r1", 2, 101.0), ("old", 3, 90.0)):
        board.report_replica("plateau", ReplicaReport(replica_id=replica_id, model="a", deployment="LLM:a@n2",
                                                      max_num_seqs=32, ongoing=ongoing, received=5, at=0.0), now=at)
    view = board.data_plane("plateau", now=101.5)
    assert view.routes == routes
    assert {r.replica_id: r.ongoing for r in view.replicas} == {"r1": 2, "r2": 1}  # latest of r1; "old" is gone
    assert {r.replica_id: r.at for r in view.replicas} == {"r1": 101.0, "r2": 100.0} and view.now == 101.5
    board.forget_replica("plateau", "r2")  # a replica that stopped says so
    assert [r.replica_id for r in board.data_plane("plateau", now=101.5).replicas] == ["r1"]
    assert board.data_plane("other", now=101.5).replicas == []


def test_status_shows_each_planned_models_gpu_sharing_and_the_plans_warnings():
    from advisor.planner import DeviceSpec, plan_replicas
    from deployments.layout import plan_summary
    from tests.factories import make_profile

    profile = make_profile().model_copy(update={"sharing": "time-slice"})  # no GPM readings
    plan = plan_replicas(profile, DeviceSpec(kind="cuda", name="H100", memory_bytes=80 * GiB))
    placement = AppPlacement(app="p", devices=[], packing=PackResult(placement={}, devices_used=0, lower_bound=0,
                                                                      unplaced=[]),
                             routes={}, plans={"a": plan_summary(plan)})
    routes = {"a": [Route(n=1, deployment="LLM:a@n1", accepting=True, running=1, max_num_seqs=32)]}
    text = render_status("p", AppStatus(placement=placement, routes=routes))
    assert f"plan: N=1, max_num_seqs {plan.max_num_seqs}, GPU sharing time-slice" in text
    assert "plan: warning: time-slicing (no MPS) and no GPU busy reading: NVML GPM gave no readings" in text
    from advisor.profiler import MeasuredGain

    gain = MeasuredGain(replicas=2, batch=32, single_tokens_per_s=1000.0, aggregate_tokens_per_s=1200.0)
    measured = plan_replicas(profile.model_copy(update={"measured_gain": gain}),
                             DeviceSpec(kind="cuda", name="H100", memory_bytes=80 * GiB))
    assert plan_summary(measured)[0].startswith("N=2, ") and "measured +20% with 2 engines" in plan_summary(measured)[0]


def test_a_new_deploy_starts_from_its_own_routes_though_its_variants_have_the_same_names():
    from cluster.board import StatusBoard

    board = StatusBoard(store=DictStore(), metrics=NoMetrics())
    first = _placement().model_copy(update={"deploy_id": "build-1"})
    board.set_placement(first)
    drained = {"a": [Route(n=1, deployment="LLM:a@n1", accepting=True, running=2, max_num_seqs=32),
                     Route(n=2, deployment="LLM:a@n2", accepting=False, running=0, max_num_seqs=32)]}
    board.publish("plateau", drained, [], [])  # the first build re-packed onto N=1
    board.set_placement(first)  # its ingress restarted: the drain holds
    assert board.routes("plateau") == drained
    second = _placement().model_copy(update={"deploy_id": "build-2"})  # `serve run` again: N=2 serves
    board.set_placement(second)
    assert board.routes("plateau") == second.routes
    assert board.status()["plateau"].placement == second
