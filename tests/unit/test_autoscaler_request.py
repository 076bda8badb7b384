"""What the builder asks Ray's autoscaler for when the packing lacks devices."""

from cluster.autoscaler import describe, device_bundle, devices_needed, resource_request
from cluster.packing import DeviceCapacity, ModelDemand, PackInput

GiB = 1 << 30


def test_demand_beyond_the_devices_adds_devices_like_the_largest_of_its_type_and_requests_the_whole_placement():
    devices = [DeviceCapacity(name="a0", memory_bytes=80 * GiB, device_type="H100"),
               DeviceCapacity(name="b0", memory_bytes=24 * GiB, device_type="L4")]
    spec = PackInput(devices=devices, models=[
        ModelDemand(model="big", replicas=5, share=0.5, memory_per_replica_bytes=30 * GiB, device_type="H100"),
        ModelDemand(model="small", replicas=1, share=0.5, memory_per_replica_bytes=10 * GiB, device_type="L4"),
    ])
    needed = devices_needed(spec)
    assert needed.packing.unplaced == []
    (m,) = needed.missing
    assert (m.kind, m.device_type, m.count, m.memory_bytes) == ("cuda", "H100", 2, 80 * GiB)  # 5 x 1/2 needs 3 H100s
    request = resource_request(needed, at=1.0)
    # every device the placement uses, the two there are included: request_resources sets a target, not a delta
    assert sorted(map(str, request.bundles)) == sorted(map(str, [
        {"GPU": 1.0, "accelerator_type:H100": 0.001}] * 3 + [{"GPU": 1.0, "accelerator_type:L4": 0.001}]))
    assert describe(needed.missing) == "2 cuda device(s) of type 'H100' of 80.0 GiB"


def test_a_type_with_no_device_and_a_replica_no_device_holds_stay_unplaced():
    spec = PackInput(devices=[DeviceCapacity(name="a0", memory_bytes=24 * GiB)], models=[
        ModelDemand(model="new", replicas=3, share=0.25, memory_per_replica_bytes=5 * GiB, device_type="A100"),
        ModelDemand(model="huge", replicas=1, share=1.0, memory_per_replica_bytes=40 * GiB),
        ModelDemand(model="fits", replicas=2, share=1.0, memory_per_replica_bytes=10 * GiB),
    ])
    needed = devices_needed(spec)
    # the size of a device of a type the cluster has none of is unknown: nothing is made up for it
    assert [(m.device_type, m.count) for m in needed.missing] == [(None, 1)]
    assert sorted((u.model, u.replicas) for u in needed.packing.unplaced) == [("huge", 1), ("new", 3)]


def test_cpu_devices_are_whole_nodes_each_with_its_own_cpus_and_enough_devices_means_nothing_missing():
    spec = PackInput(devices=[DeviceCapacity(name="n0", kind="cpu", memory_bytes=64 * GiB, cpus=16),
                              DeviceCapacity(name="n1", kind="cpu", memory_bytes=32 * GiB, cpus=4)], models=[
        ModelDemand(model="m", kind="cpu", replicas=6, share=0.5, memory_per_replica_bytes=GiB)])
    needed = devices_needed(spec)
    assert needed.missing[0].count == 1 and needed.missing[0].kind == "cpu"
    # the added node is like the largest; each existing node asks for its own CPUs
    assert sorted(b["CPU"] for b in resource_request(needed, at=0.0).bundles) == [4.0, 16.0, 16.0]
    assert devices_needed(PackInput(devices=spec.devices, models=[spec.models[0].model_copy(update={"replicas": 4})])
                          ).missing == []
    assert device_bundle(DeviceCapacity(name="g", memory_bytes=GiB)) == {"GPU": 1.0}


def test_devices_added_before_keep_their_names_and_new_ones_get_free_names():
    """The policy packs onto the start placement's devices, added ones ("+cuda-0") included."""
    devices = [DeviceCapacity(name="g0", memory_bytes=8 * GiB), DeviceCapacity(name="+cuda-0", memory_bytes=8 * GiB)]
    spec = PackInput(devices=devices, models=[ModelDemand(model="m", replicas=4, share=1.0,
                                                          memory_per_replica_bytes=4 * GiB)])
    needed = devices_needed(spec)
    assert sorted(needed.packing.placement) == ["+cuda-0", "+cuda-1", "+cuda-2", "g0"]
    assert [(m.kind, m.count) for m in needed.missing] == [("cuda", 2)]  # the earlier added one counts as there
