"""The devices of a Ray cluster that replicas are packed onto.

GPUs come from Ray's resources (how many each alive node has) plus NVML on that node (name,
memory, memory bandwidth); on a node whose GPUs NVML cannot see (logical GPUs on a CPU machine,
`ray start --num-gpus=2`) the memory is the one the config declares, else the node's memory split
evenly. On a CPU-only cluster each node is one device. A device's type is its node's Ray
accelerator type (the `accelerator_type:<T>` resource Ray adds to nodes whose GPUs it detects, or
that `ray start --resources` declares): a model pinned to a type (`device_type` in config.yaml) is
profiled, planned and packed on devices of that type only. `devices_from_nodes` is pure; the
functions below it read Ray and NVML.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.nvml import GpuSelectionError, nvml_handle, physical_entry, raylet_visible_devices, visible_entries
from cluster.packing import DeviceCapacity

logger = logging.getLogger(__name__)

ACCELERATOR_TYPE_PREFIX = "accelerator_type:"  # Ray's resource for a node's accelerator type

MemorySource = Literal["nvml", "declared", "node-share", "node"]


class GpuReading(BaseModel):
    """What NVML says about one GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int = Field(description="Ray's GPU id on the node (its raylet's index-th visible device), not NVML's "
                                   "physical index.")
    name: str
    memory_bytes: int = Field(gt=0)
    bandwidth_bytes_per_s: Optional[float] = Field(None, description="Peak DRAM bandwidth (bus width x clock).")


class NodeResources(BaseModel):
    """One alive Ray node as the inventory needs it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    node_id: str
    address: str
    cpus: float
    gpus: float
    memory_bytes: int = Field(description="Memory Ray may use on the node.")
    gpu_readings: list[GpuReading] = Field(default_factory=list, description="NVML readings, empty without NVML.")
    accelerator_type: Optional[str] = Field(None, description="Ray's accelerator type of the node (H100, A10G...).")


class Device(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="<node address>/gpu<i> or <node address>/cpu (<address>#<node id prefix> where "
                                  "several nodes shared an address when the node was first read; a node keeps its name).")
    node_id: str
    node_address: str = Field("", description="The node's address (several nodes of one machine share it).")
    kind: Literal["cuda", "cpu"]
    model_name: str = Field(description="NVML name, 'logical GPU', or 'CPU node'.")
    memory_bytes: int
    memory_source: MemorySource
    bandwidth_bytes_per_s: Optional[float] = None
    cores: float = Field(description="CPUs of the node (a CPU device) or the node's CPUs per GPU.")
    device_type: Optional[str] = Field(None, description="The node's Ray accelerator type, if it has one.")

    def capacity(self) -> DeviceCapacity:
        return DeviceCapacity(name=self.name, kind=self.kind, memory_bytes=self.memory_bytes,
                              device_type=self.device_type, cpus=self.cores if self.kind == "cpu" else 0.0)


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    devices: list[Device]

    @property
    def kind(self) -> Literal["cuda", "cpu"]:
        return "cuda" if any(d.kind == "cuda" for d in self.devices) else "cpu"

    @property
    def smallest_memory_bytes(self) -> int:
        """Memory of the smallest device: what a plan for 'any device' of this cluster may use."""
        return min(d.memory_bytes for d in self.devices)

    def capacities(self) -> list[DeviceCapacity]:
        return [d.capacity() for d in self.devices]

    def hosts(self) -> dict[str, str]:
        """Node id -> the prefix of its devices' names (what a later read keeps them as)."""
        return {d.node_id: d.name.rsplit("/", 1)[0] for d in self.devices}

    @property
    def device_types(self) -> list[str]:
        return sorted({d.device_type for d in self.devices if d.device_type})

    def of_type(self, device_type: Optional[str]) -> "Inventory":
        """The devices of one Ray accelerator type (all devices for None); fails naming the types there are."""
        if device_type is None:
            return self
        devices = [d for d in self.devices if d.device_type == device_type]
        if not devices:
            there = ", ".join(self.device_types) or "none (no node has an accelerator_type:<T> resource)"
            raise ValueError(f"no device of type {device_type!r} in the cluster; its device types: {there}")
        return Inventory(devices=devices)


def devices_from_nodes(nodes: list[NodeResources], declared_gpu_memory: Optional[int] = None,
                       use_gpus: bool = True, hosts: Optional[dict[str, str]] = None) -> Inventory:
    """GPU devices when the cluster has GPUs (and `use_gpus`), else one CPU device per node.

    `hosts` (node id -> the prefix its device names got in an earlier read of this cluster) keeps
    names stable: a node keeps its name when another one joins its address. It is updated in
    place with the new nodes' prefixes, and forgets nodes that are gone."""
    devices: list[Device] = []
    has_gpus = use_gpus and any(n.gpus >= 1 for n in nodes)
    hosts = {} if hosts is None else hosts
    for gone in set(hosts) - {n.node_id for n in nodes}:
        del hosts[gone]
    addresses = [n.address for n in nodes]
    prefixes = [n.node_id[:8] for n in nodes]
    for node in sorted(nodes, key=lambda n: (n.address, n.node_id)):
        host = hosts.get(node.node_id)
        if host is None:
            # several nodes of one machine share its address: their node ids keep the device names apart
            # (the first 8 characters, or the whole id where those are shared, as by Ray's fake nodes' ids)
            short = node.node_id[:8] if prefixes.count(node.node_id[:8]) == 1 else node.node_id
            alone = addresses.count(node.address) == 1
            host = hosts[node.node_id] = node.address if alone else f"{node.address}#{short}"
        if not has_gpus:
            devices.append(Device(name=f"{host}/cpu", node_id=node.node_id, node_address=node.address, kind="cpu", model_name="CPU node",
                                  memory_bytes=node.memory_bytes, memory_source="node", cores=node.cpus,
                                  device_type=node.accelerator_type))
            continue
        count = int(node.gpus)  # a fractional remainder cannot host a whole device's worth
        readings = {r.index: r for r in node.gpu_readings}
        for i in range(count):
            r = readings.get(i)
            if r is not None:
                memory, source, name, bw = r.memory_bytes, "nvml", r.name, r.bandwidth_bytes_per_s
            elif declared_gpu_memory:
                memory, source, name, bw = declared_gpu_memory, "declared", "logical GPU", None
            else:
                memory, source, name, bw = node.memory_bytes // count, "node-share", "logical GPU", None
            devices.append(Device(name=f"{host}/gpu{i}", node_id=node.node_id, node_address=node.address, kind="cuda", model_name=name,
                                  memory_bytes=memory, memory_source=source, bandwidth_bytes_per_s=bw,
                                  cores=node.cpus / count, device_type=node.accelerator_type))
    return Inventory(devices=devices)


# ---- reading the live cluster ---------------------------------------------------------------

class NodeReadError(RuntimeError):
    """A node of a running cluster did not answer for its GPUs: the read is not to be used."""


def gpu_readings(nvml: Any, cuda_visible_devices: Optional[str]) -> list[GpuReading]:
    """NVML's reading of each GPU Ray counts on this node, indexed by Ray's GPU id.

    Ray counts min(NVML's devices, the raylet's `CUDA_VISIBLE_DEVICES` entries) GPUs and its GPU id
    i is the raylet's i-th entry (`ray.get_gpu_ids()` maps ids through the entries the worker
    started with, and a replica's `CUDA_VISIBLE_DEVICES` is that entry), in the order the entries
    are written, not NVML's physical order; NVML's device i where the variable is unset. An entry
    is an index or a GPU-/MIG- UUID, so each is mapped to its NVML handle. An entry NVML does not
    know is left out (that GPU keeps its logical memory) and logged."""
    entries = visible_entries(cuda_visible_devices)
    count = int(nvml.nvmlDeviceGetCount())
    out = []
    for ray_id in range(count if entries is None else min(count, len(entries))):
        entry = physical_entry(ray_id, cuda_visible_devices)
        try:
            h = nvml_handle(nvml, entry)
            name = nvml.nvmlDeviceGetName(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h).total
        except (GpuSelectionError, nvml.NVMLError) as exc:
            logger.warning("Ray GPU %d (CUDA_VISIBLE_DEVICES entry %r) has no NVML reading: %s", ray_id, entry, exc)
            continue
        out.append(GpuReading(index=ray_id, name=name.decode() if isinstance(name, bytes) else name,
                              memory_bytes=int(mem), bandwidth_bytes_per_s=_peak_bandwidth(nvml, h)))
    return out


def read_gpus(nvml: Any = None) -> list[GpuReading]:
    """NVML's view of this node's GPUs by Ray GPU id (`gpu_readings`); empty where NVML is missing
    (CPU machines)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:  # no pynvml, NVMLError_LibraryNotFound / DriverNotLoaded on machines without GPUs
        return []
    try:
        return gpu_readings(nvml, raylet_visible_devices())
    finally:
        nvml.nvmlShutdown()


def _peak_bandwidth(pynvml, handle) -> Optional[float]:
    try:
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except Exception:
        return None
    return 2.0 * clock_mhz * 1e6 * bus_bits / 8  # double data rate


def read_nodes(timeout_s: float = 30.0, known: Optional[dict[str, list[GpuReading]]] = None) -> list[NodeResources]:
    """Alive Ray nodes; each GPU node is asked for its NVML readings by a task pinned to it. A node
    that does not answer keeps its logical GPUs. With `known` (node id -> readings, kept between
    reads of a running cluster: a node's GPUs do not change) only new nodes are asked, `known` gets
    their readings and forgets nodes that are gone, and a node that does not answer fails the read
    with `NodeReadError` (a device read from the node's memory instead of NVML would be wrong)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if known is not None:
        for gone in set(known) - {n["NodeID"] for n in nodes}:
            del known[gone]
    read = ray.remote(num_cpus=0)(read_gpus)
    pending = {}
    for n in nodes:
        if n["Resources"].get("GPU", 0) >= 1 and n["NodeID"] not in (known or {}):
            strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            pending[n["NodeID"]] = read.options(scheduling_strategy=strategy).remote()
    readings: dict[str, list[GpuReading]] = dict(known or {})
    for node_id, ref in pending.items():
        try:
            readings[node_id] = ray.get(ref, timeout=timeout_s)
            if known is not None:
                known[node_id] = readings[node_id]
        except Exception as exc:  # a node that cannot answer still has its logical GPUs
            ray.cancel(ref)
            if known is not None:
                raise NodeReadError(f"no NVML reading from node {node_id}: {exc}") from exc
            logger.warning("no NVML reading from node %s: %s", node_id, exc)
            readings[node_id] = []
    return [
        NodeResources(node_id=n["NodeID"], address=n.get("NodeManagerAddress", n["NodeID"][:8]),
                      cpus=float(n["Resources"].get("CPU", 0.0)), gpus=float(n["Resources"].get("GPU", 0.0)),
                      memory_bytes=int(n["Resources"].get("memory", 0.0)), gpu_readings=readings.get(n["NodeID"], []),
                      accelerator_type=accelerator_type(n["Resources"], f"node {n['NodeID'][:8]}"))
        for n in nodes
    ]


def accelerator_type(resources: dict[str, float], node: str = "a node") -> Optional[str]:
    """The node's Ray accelerator type from its `accelerator_type:<T>` resource (None without one).
    A node with several (one Ray detected, one declared with `ray start --resources`) is planned as
    the first by name, and the log says so: a device has one type."""
    types = sorted(k[len(ACCELERATOR_TYPE_PREFIX):] for k in resources if k.startswith(ACCELERATOR_TYPE_PREFIX))
    if len(types) > 1:
        logger.warning("%s has %d accelerator types (%s): its devices are planned and packed as %r; give each "
                       "node one `accelerator_type:<T>` resource to choose", node, len(types), ", ".join(types),
                       types[0])
    return types[0] if types else None


def device_changes(before: list[str], now: list[str]) -> tuple[list[str], list[str]]:
    """The device names in `now` but not `before` (joined), and in `before` but not `now` (left)."""
    return [n for n in now if n not in before], [n for n in before if n not in now]


class NodeCache:
    """What reads of one running cluster remember: each node's NVML readings (a node's GPUs do not
    change: it is asked once) and its devices' name prefix (names stay when nodes join)."""

    def __init__(self, hosts: Optional[dict[str, str]] = None):
        self.readings: dict[str, list[GpuReading]] = {}
        self.hosts: dict[str, str] = dict(hosts or {})


class DeviceRead(BaseModel):
    """How the builder read the cluster's devices, so the autoscaling policy can read them again the
    same way (nodes join and leave a running cluster)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    declared_gpu_memory: Optional[int] = Field(None, gt=0, description="config's device_memory, if set.")
    use_gpus: bool = Field(True, description="Replicas run on GPUs (else one CPU device per node).")
    hosts: dict[str, str] = Field(default_factory=dict, description="Node id -> its devices' name prefix in the "
                                                                    "builder's read (later reads keep the names).")

    def inventory(self, cache: Optional[NodeCache] = None) -> Inventory:
        """The devices now; `cache` is kept between reads of a running cluster (see `NodeCache`, `read_nodes`)."""
        nodes = read_nodes(known=cache.readings if cache is not None else None)
        return devices_from_nodes(nodes, self.declared_gpu_memory, self.use_gpus,
                                  hosts=cache.hosts if cache is not None else None)
