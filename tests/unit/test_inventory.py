from types import SimpleNamespace

import pytest

from cluster.inventory import GpuReading, NodeResources, devices_from_nodes

GiB = 1 << 30


def node(node_id="n1", address="10.0.0.1", cpus=16.0, gpus=0.0, memory=64 * GiB, readings=()):
    return NodeResources(node_id=node_id, address=address, cpus=cpus, gpus=gpus, memory_bytes=memory,
                         gpu_readings=list(readings))


def test_gpus_take_nvml_memory_and_bandwidth():
    h100 = [GpuReading(index=i, name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GiB, bandwidth_bytes_per_s=3.35e12)
            for i in range(2)]
    inv = devices_from_nodes([node(gpus=2, readings=h100)])
    assert [d.name for d in inv.devices] == ["10.0.0.1/gpu0", "10.0.0.1/gpu1"]
    assert all(d.memory_source == "nvml" and d.memory_bytes == 80 * GiB and d.cores == 8 for d in inv.devices)
    assert inv.kind == "cuda" and inv.devices[0].bandwidth_bytes_per_s == 3.35e12


def test_logical_gpus_use_the_declared_memory_else_a_share_of_the_node():
    declared = devices_from_nodes([node(gpus=2)], declared_gpu_memory=8 * GiB)
    assert [(d.memory_bytes, d.memory_source, d.model_name) for d in declared.devices] == [
        (8 * GiB, "declared", "logical GPU")] * 2
    shared = devices_from_nodes([node(gpus=2, memory=20 * GiB)])
    assert [(d.memory_bytes, d.memory_source) for d in shared.devices] == [(10 * GiB, "node-share")] * 2


def test_cpu_only_cluster_has_one_device_per_node_and_gpu_nodes_can_be_ignored():
    nodes = [node("b", "10.0.0.2", cpus=8), node("a", "10.0.0.1", cpus=4)]
    inv = devices_from_nodes(nodes)
    assert [(d.name, d.kind, d.cores) for d in inv.devices] == [("10.0.0.1/cpu", "cpu", 4), ("10.0.0.2/cpu", "cpu", 8)]
    assert devices_from_nodes([node(gpus=1)], use_gpus=False).kind == "cpu"


def test_fractional_gpu_remainders_are_not_devices_and_capacities_feed_the_packer():
    inv = devices_from_nodes([node(gpus=1.5)], declared_gpu_memory=4 * GiB)
    caps = inv.capacities()
    assert len(caps) == 1 and caps[0].share == 1.0 and caps[0].memory_bytes == 4 * GiB and caps[0].kind == "cuda"


def test_a_node_with_two_accelerator_types_is_planned_as_the_first_and_the_log_says_so(caplog):
    from cluster.inventory import accelerator_type

    with caplog.at_level("WARNING", logger="cluster.inventory"):
        assert accelerator_type({"GPU": 1, "accelerator_type:L4": 1, "accelerator_type:A10G": 1}, "node ab12") == "A10G"
    assert "node ab12 has 2 accelerator types (A10G, L4)" in caplog.text and "'A10G'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cluster.inventory"):
        assert accelerator_type({"GPU": 1, "accelerator_type:L4": 1}) == "L4"
    assert caplog.text == ""


def test_device_types_come_from_rays_accelerator_type_resource_and_select_devices():
    from cluster.inventory import accelerator_type

    assert accelerator_type({"CPU": 8, "GPU": 2, "accelerator_type:H100": 1}) == "H100"
    assert accelerator_type({"CPU": 8}) is None
    nodes = [NodeResources(node_id="a", address="10.0.0.1", cpus=8, gpus=1, memory_bytes=16 * GiB, accelerator_type="A"),
             NodeResources(node_id="b", address="10.0.0.2", cpus=8, gpus=2, memory_bytes=16 * GiB, accelerator_type="B")]
    inv = devices_from_nodes(nodes)
    assert inv.device_types == ["A", "B"]
    assert [(d.name, d.memory_bytes) for d in inv.of_type("B").devices] == [("10.0.0.2/gpu0", 8 * GiB),
                                                                            ("10.0.0.2/gpu1", 8 * GiB)]
    assert [c.device_type for c in inv.capacities()] == ["A", "B", "B"]
    assert inv.of_type(None) is inv
    with pytest.raises(ValueError, match="no device of type 'H100' in the cluster; its device types: A, B"):
        inv.of_type("H100")


def test_nodes_that_share_an_address_get_device_names_apart_by_node_id():
    nodes = [node("aaaaaaaa11", "10.0.0.1", gpus=1), node("bbbbbbbb22", "10.0.0.1", gpus=1), node("c", "10.0.0.2", gpus=1)]
    names = [d.name for d in devices_from_nodes(nodes, declared_gpu_memory=GiB).devices]
    assert names == ["10.0.0.1#aaaaaaaa/gpu0", "10.0.0.1#bbbbbbbb/gpu0", "10.0.0.2/gpu0"]
    assert [d.node_address for d in devices_from_nodes(nodes, declared_gpu_memory=GiB).devices] == \
        ["10.0.0.1", "10.0.0.1", "10.0.0.2"]
    assert [d.name for d in devices_from_nodes(nodes[:2], use_gpus=False).devices] == ["10.0.0.1#aaaaaaaa/cpu",
                                                                                      "10.0.0.1#bbbbbbbb/cpu"]


def test_a_node_keeps_its_device_names_when_another_joins_its_address():
    hosts = {}
    first = [node("aaaaaaaa11", "10.0.0.1", gpus=1)]
    assert [d.name for d in devices_from_nodes(first, declared_gpu_memory=GiB, hosts=hosts).devices] == ["10.0.0.1/gpu0"]
    joined = first + [node("bbbbbbbb22", "10.0.0.1", gpus=1)]
    names = [d.name for d in devices_from_nodes(joined, declared_gpu_memory=GiB, hosts=hosts).devices]
    assert names == ["10.0.0.1/gpu0", "10.0.0.1#bbbbbbbb/gpu0"]  # the first keeps its name, the newcomer is told apart
    # the first node leaves: it is forgotten, the second keeps its name; a node that comes back is new
    assert [d.name for d in devices_from_nodes(joined[1:], declared_gpu_memory=GiB, hosts=hosts).devices] == \
        ["10.0.0.1#bbbbbbbb/gpu0"]
    assert hosts == {"bbbbbbbb22": "10.0.0.1#bbbbbbbb"}
    assert [d.name for d in devices_from_nodes(joined, declared_gpu_memory=GiB, hosts=hosts).devices] == \
        ["10.0.0.1#aaaaaaaa/gpu0", "10.0.0.1#bbbbbbbb/gpu0"]
    # a read without memory names both by id, as before
    assert [d.name for d in devices_from_nodes(joined, declared_gpu_memory=GiB).devices] == \
        ["10.0.0.1#aaaaaaaa/gpu0", "10.0.0.1#bbbbbbbb/gpu0"]


def test_the_builders_names_seed_the_policys_reads(monkeypatch):
    from cluster import inventory as inv_mod
    from cluster.inventory import DeviceRead, NodeCache

    first = [node("aaaaaaaa11", "10.0.0.1", gpus=1)]
    deployed = devices_from_nodes(first, declared_gpu_memory=GiB)
    read = DeviceRead(declared_gpu_memory=GiB, hosts=deployed.hosts())
    assert read.hosts == {"aaaaaaaa11": "10.0.0.1"}
    monkeypatch.setattr(inv_mod, "read_nodes", lambda known=None: first + [node("bbbbbbbb22", "10.0.0.1", gpus=1)])
    cache = NodeCache(read.hosts)
    assert [d.name for d in read.inventory(cache).devices] == ["10.0.0.1/gpu0", "10.0.0.1#bbbbbbbb/gpu0"]


def test_nodes_whose_ids_share_the_first_8_characters_are_named_by_their_whole_ids():
    # Ray's fake multi-node provider's ids: fff...f00000 (head), fff...f00001, ...
    ids = ["f" * 51 + "00000", "f" * 51 + "00001"]
    nodes = [node(ids[0], "10.0.0.1", gpus=1), node(ids[1], "10.0.0.1", gpus=1)]
    names = [d.name for d in devices_from_nodes(nodes, declared_gpu_memory=GiB).devices]
    assert names == [f"10.0.0.1#{ids[0]}/gpu0", f"10.0.0.1#{ids[1]}/gpu0"]


class FakeRay:
    """The slice of Ray's API `read_nodes` calls: alive nodes, tasks pinned to them, get and cancel."""

    def __init__(self, nodes, failing=()):
        self.nodes_now, self.failing, self.asked, self.cancelled = nodes, set(failing), [], []

    def nodes(self):
        return [{"NodeID": i, "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0, "GPU": 1.0,
                                                                                               "memory": 8.0 * GiB}}
                for i in self.nodes_now]

    def remote(self, **_):
        fake = self

        class Task:
            def options(self, scheduling_strategy):
                return SimpleNamespace(remote=lambda: fake.asked.append(scheduling_strategy.node_id)
                                       or scheduling_strategy.node_id)
        return lambda fn: Task()

    def get(self, ref, timeout):
        if ref in self.failing:
            raise TimeoutError("GetTimeoutError")
        return [GpuReading(index=0, name="NVIDIA L4", memory_bytes=24 * GiB)]

    def cancel(self, ref):
        self.cancelled.append(ref)


def test_rereading_a_running_cluster_asks_each_gpu_node_once_forgets_gone_ones_and_fails_on_a_silent_node(monkeypatch):
    import ray

    from cluster.inventory import NodeReadError, read_nodes

    fake = FakeRay(["a" * 56, "b" * 56])
    for name in ("nodes", "remote", "get", "cancel"):
        monkeypatch.setattr(ray, name, getattr(fake, name))
    known = {}
    assert [n.gpu_readings[0].memory_bytes for n in read_nodes(known=known)] == [24 * GiB] * 2
    assert fake.asked == ["a" * 56, "b" * 56] and sorted(known) == ["a" * 56, "b" * 56]
    fake.nodes_now = ["a" * 56, "c" * 56]  # b left, c joined
    assert [n.gpu_readings[0].memory_bytes for n in read_nodes(known=known)] == [24 * GiB] * 2
    assert fake.asked[2:] == ["c" * 56] and sorted(known) == ["a" * 56, "c" * 56]  # a not asked again, b forgotten
    fake.nodes_now.append("d" * 56)
    fake.failing.add("d" * 56)
    with pytest.raises(NodeReadError, match="no NVML reading from node d+"):
        read_nodes(known=known)  # its memory from the node's RAM would be wrong: the read is not used
    assert fake.cancelled == ["d" * 56] and "d" * 56 not in known
    # the builder's one read keeps a silent node's logical GPUs
    assert [n.gpu_readings for n in read_nodes()][2] == []
