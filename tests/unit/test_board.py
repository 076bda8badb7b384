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
