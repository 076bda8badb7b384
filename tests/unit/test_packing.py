"""The packer: hand cases and properties (hypothesis)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.packing import DeviceCapacity, ModelDemand, PackInput, pack

GIB = 2**30


def gpus(n, mem=80 * GIB):
    return [DeviceCapacity(name=f"gpu{i:03d}", memory_bytes=mem) for i in range(n)]


def check_capacity(spec, result):
    devices = {d.name: d for d in spec.devices}
    for name, items in result.placement.items():
        assert sum(p.share for p in items) <= devices[name].share + 1e-9
        assert sum(p.memory_bytes for p in items) <= devices[name].memory_bytes


def test_two_models_share_devices_by_share_and_memory():
    spec = PackInput(devices=gpus(4), models=[
        ModelDemand(model="a", replicas=4, share=0.25, memory_per_replica_bytes=15 * GIB),
        ModelDemand(model="b", replicas=2, share=0.5, memory_per_replica_bytes=30 * GIB),
    ])
    result = pack(spec)
    check_capacity(spec, result)
    assert result.devices_used == 2 == result.lower_bound
    assert result.unplaced == []
    assert sum(p.replicas for items in result.placement.values() for p in items if p.model == "a") == 4


def test_memory_binds_before_share():
    spec = PackInput(devices=gpus(3, mem=40 * GIB), models=[
        ModelDemand(model="a", replicas=4, share=0.25, memory_per_replica_bytes=15 * GIB)])
    result = pack(spec)
    check_capacity(spec, result)
    assert result.devices_used == 2 and all(items[0].replicas == 2 for items in result.placement.values())


def test_what_does_not_fit_is_reported_with_the_shortfall():
    spec = PackInput(devices=gpus(1, mem=40 * GIB), models=[
        ModelDemand(model="huge", replicas=1, share=0.5, memory_per_replica_bytes=60 * GIB),
        ModelDemand(model="many", replicas=5, share=0.25, memory_per_replica_bytes=5 * GIB),
    ])
    result = pack(spec)
    by_model = {u.model: u for u in result.unplaced}
    assert "largest cuda device has 1 and 40.00 GiB" in by_model["huge"].reason
    assert by_model["many"].replicas == 1 and "full" in by_model["many"].reason


def test_packing_is_deterministic_and_kinds_do_not_mix():
    spec = PackInput(devices=gpus(2) + [DeviceCapacity(name="cpu0", kind="cpu", memory_bytes=24 * GIB)], models=[
        ModelDemand(model="g", replicas=3, share=0.5, memory_per_replica_bytes=GIB),
        ModelDemand(model="c", kind="cpu", replicas=2, share=0.5, memory_per_replica_bytes=5 * GIB)])
    assert pack(spec) == pack(spec)
    assert [p.model for p in pack(spec).placement["cpu0"]] == ["c"]


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="device names must be unique"):
        PackInput(devices=gpus(1) + gpus(1), models=[])


demand = st.builds(
    lambda i, r, n, mem: ModelDemand(model=f"m{i}", replicas=r, share=1 / n, memory_per_replica_bytes=mem * GIB),
    st.integers(0, 10_000), st.integers(0, 12), st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 90),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(demand, max_size=12, unique_by=lambda m: m.model), st.integers(1, 30),
       st.sampled_from([40, 80, 141]))
def test_never_overcommits_and_accounts_for_every_replica(models, n_devices, mem_gib):
    spec = PackInput(devices=gpus(n_devices, mem=mem_gib * GIB), models=models)
    result = pack(spec)
    check_capacity(spec, result)
    placed = {}
    for items in result.placement.values():
        for p in items:
            placed[p.model] = placed.get(p.model, 0) + p.replicas
    for m in models:
        missing = sum(u.replicas for u in result.unplaced if u.model == m.model)
        assert placed.get(m.model, 0) + missing == m.replicas


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16), st.sampled_from([1, 2, 4, 8])), min_size=1, max_size=10))
def test_all_placed_and_within_one_device_of_the_bound_on_simple_cases(rows):
    # Power-of-two shares and memory proportional to share: a one-dimensional, divisible case.
    models = [ModelDemand(model=f"m{i}", replicas=r, share=1 / n, memory_per_replica_bytes=int(80 * GIB / n))
              for i, (r, n) in enumerate(rows)]
    need = math.ceil(sum(r / n for r, n in rows) - 1e-9)
    spec = PackInput(devices=gpus(need + 2), models=models)
    result = pack(spec)
    assert result.unplaced == []
    assert result.devices_used <= result.lower_bound + 1


def typed_gpus():
    return ([DeviceCapacity(name=f"a{i}", memory_bytes=80 * GIB, device_type="H100") for i in range(2)]
            + [DeviceCapacity(name=f"b{i}", memory_bytes=24 * GIB, device_type="L4") for i in range(2)])


def test_a_model_pinned_to_a_device_type_goes_only_onto_devices_of_that_type():
    spec = PackInput(devices=typed_gpus(), models=[
        ModelDemand(model="big", replicas=3, share=0.5, memory_per_replica_bytes=30 * GIB, device_type="H100"),
        ModelDemand(model="small", replicas=3, share=0.5, memory_per_replica_bytes=10 * GIB, device_type="L4"),
        ModelDemand(model="any", replicas=1, share=0.5, memory_per_replica_bytes=10 * GIB),
    ])
    result = pack(spec)
    check_capacity(spec, result)
    where = {p.model: [] for items in result.placement.values() for p in items}
    for dev, items in result.placement.items():
        for p in items:
            where[p.model] += [dev] * p.replicas
    assert len(where["big"]) == 3 and {d[0] for d in where["big"]} == {"a"}
    assert len(where["small"]) == 3 and {d[0] for d in where["small"]} == {"b"}
    assert len(where["any"]) == 1 and result.unplaced == []
    # the two types' pinned demand needs two devices of each: the bound counts them apart
    assert result.lower_bound == 4


def test_pinned_demand_that_its_type_cannot_hold_is_unplaced_naming_the_type():
    spec = PackInput(devices=typed_gpus(), models=[
        ModelDemand(model="big", replicas=1, share=1.0, memory_per_replica_bytes=40 * GIB, device_type="L4"),
        ModelDemand(model="ghost", replicas=2, share=0.5, memory_per_replica_bytes=GIB, device_type="A100"),
        ModelDemand(model="many", replicas=5, share=0.5, memory_per_replica_bytes=GIB, device_type="L4"),
    ])
    result = pack(spec)
    reasons = {u.model: (u.replicas, u.reason) for u in result.unplaced}
    assert reasons["big"][0] == 1 and "largest cuda device of type 'L4' has 1 and 24.00 GiB" in reasons["big"][1]
    assert reasons["ghost"] == (2, "no cuda devices of type 'A100'")
    assert reasons["many"][0] == 1 and "all 2 cuda devices of type 'L4' are full" in reasons["many"][1]
    assert not any(p.model in ("many", "big") for d in ("a0", "a1") for p in result.placement.get(d, []))


def test_unpinned_demand_does_not_take_the_device_a_pinned_model_needs():
    spec = PackInput(devices=[DeviceCapacity(name="h100", memory_bytes=80 * GIB, device_type="H100"),
                              DeviceCapacity(name="l4", memory_bytes=24 * GIB, device_type="L4")], models=[
        ModelDemand(model="a", replicas=1, share=1.0, memory_per_replica_bytes=20 * GIB),
        ModelDemand(model="b", replicas=1, share=1.0, memory_per_replica_bytes=70 * GIB, device_type="H100"),
    ])
    result = pack(spec)
    assert result.unplaced == []
    assert {d: [p.model for p in ps] for d, ps in result.placement.items()} == {"h100": ["b"], "l4": ["a"]}
