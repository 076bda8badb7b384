"""A node's NVML readings are indexed by Ray's GPU ids, which follow the raylet's
CUDA_VISIBLE_DEVICES entries in their order (an index or a UUID each), not NVML's physical order."""

from __future__ import annotations

from cluster.inventory import NodeResources, devices_from_nodes, gpu_readings, raylet_visible_devices, read_gpus
from tests.fake_nvml import FakeNvml

GIB = 1 << 30


class TwoKindsNvml(FakeNvml):
    """Physical GPU 0 is an L4 (24 GiB), GPU 1 an H100 (80 GiB), GPU 2 an A10G (24 GiB)."""

    models = [("NVIDIA L4", 24), ("NVIDIA H100 80GB HBM3", 80), ("NVIDIA A10G", 24)]

    def __init__(self, **kw):
        super().__init__(**kw)
        self.uuids = self.uuids + ["GPU-0c0c0c0c-3333-3333-3333-333333333333"]
        self.used[2] = 0

    def nvmlDeviceGetName(self, handle):
        return self.models[handle[1]][0].encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = self.models[handle[1]][1] * GIB
        return type("Memory", (), {"total": total, "used": 0, "free": total})()


def names(readings):
    return [(r.index, r.name) for r in readings]


def test_ray_gpu_ids_follow_the_raylets_visible_devices_order():
    nvml = TwoKindsNvml()
    # `CUDA_VISIBLE_DEVICES=2,0 ray start`: Ray's GPU 0 is physical GPU 2, its GPU 1 physical GPU 0
    assert names(gpu_readings(nvml, "2,0")) == [(0, "NVIDIA A10G"), (1, "NVIDIA L4")]
    assert names(gpu_readings(nvml, None)) == [(0, "NVIDIA L4"), (1, "NVIDIA H100 80GB HBM3"), (2, "NVIDIA A10G")]


def test_uuid_entries_name_their_gpus():
    nvml = TwoKindsNvml()
    readings = gpu_readings(nvml, f"{nvml.uuids[1]},{nvml.uuids[0]}")
    assert [(r.index, r.name, r.memory_bytes) for r in readings] == [(0, "NVIDIA H100 80GB HBM3", 80 * GIB),
                                                                      (1, "NVIDIA L4", 24 * GIB)]


def test_an_entry_nvml_does_not_know_leaves_that_gpu_logical_and_the_rest_read():
    readings = gpu_readings(TwoKindsNvml(), "GPU-ffff,1")
    assert names(readings) == [(1, "NVIDIA H100 80GB HBM3")]
    node = NodeResources(node_id="n", address="10.0.0.1", cpus=8, gpus=2, memory_bytes=64 * GIB,
                         gpu_readings=readings)
    devices = devices_from_nodes([node], declared_gpu_memory=16 * GIB).devices
    assert [(d.name, d.memory_bytes, d.memory_source) for d in devices] == [
        ("10.0.0.1/gpu0", 16 * GIB, "declared"), ("10.0.0.1/gpu1", 80 * GIB, "nvml")]


def test_ray_counts_no_more_gpus_than_the_raylet_sees():
    assert names(gpu_readings(TwoKindsNvml(), "1")) == [(0, "NVIDIA H100 80GB HBM3")]
    assert gpu_readings(TwoKindsNvml(), "") == []


def test_read_gpus_maps_through_the_raylets_devices_and_shuts_nvml_down(monkeypatch):
    import cluster.inventory as inventory

    monkeypatch.setattr(inventory, "raylet_visible_devices", lambda: "2,0")
    shut = []

    class Counting(TwoKindsNvml):
        def nvmlShutdown(self):
            shut.append(True)

    assert names(read_gpus(Counting())) == [(0, "NVIDIA A10G"), (1, "NVIDIA L4")] and shut == [True]
    assert read_gpus(FakeNvml(init_fails=True)) == []


def test_the_raylets_devices_are_what_the_worker_recorded_when_it_started(monkeypatch):
    from ray._private.worker import global_worker

    monkeypatch.setattr(global_worker, "original_visible_accelerator_ids", {"GPU": ["2", "0"]}, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what a GPU-less task may see
    assert raylet_visible_devices() == "2,0"
    monkeypatch.setattr(global_worker, "original_visible_accelerator_ids", {"GPU": None}, raising=False)
    assert raylet_visible_devices() is None


def test_a_task_that_holds_no_gpu_gets_the_nodes_visible_devices_back(monkeypatch):
    import advisor.nvml as nvml

    monkeypatch.setattr(nvml, "raylet_visible_devices", lambda: "2,0")
    blanked = {"CUDA_VISIBLE_DEVICES": ""}  # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1
    nvml.restore_raylet_devices(blanked)
    assert blanked == {"CUDA_VISIBLE_DEVICES": "2,0"}
    kept = {"CUDA_VISIBLE_DEVICES": "1"}
    nvml.restore_raylet_devices(kept)
    assert kept == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setattr(nvml, "raylet_visible_devices", lambda: None)  # the raylet saw every GPU
    blanked = {"CUDA_VISIBLE_DEVICES": ""}
    nvml.restore_raylet_devices(blanked)
    assert blanked == {}
