"""Pure packer: replicas of many models onto devices by GPU share and memory.

Best-fit decreasing over two dimensions (share of the device, memory): models are taken largest
replica first; each model's replicas go, as many at a time as fit, onto the already-used device
with the least room left, and a new device is opened only when none has room (largest free
device first). Deterministic (ties break by name), never above a device's share 1.0 or its
memory, and demand that fits nowhere is reported as unplaced with the reason and the shortfall.
A model pinned to a device type goes only onto devices of that type, and is placed before the
unpinned ones, which go onto any device of their kind (devices of types no pinned model needs
first).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

EPS = 1e-9  # shares like 3 x 1/3 must fill a device exactly


class DeviceCapacity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="Unique device name, e.g. node1/gpu0.")
    kind: Literal["cuda", "cpu"] = "cuda"
    memory_bytes: int = Field(gt=0, description="Memory the replicas on it may use.")
    share: float = Field(1.0, gt=0, description="Schedulable share (1.0 = the whole device).")
    device_type: Optional[str] = Field(None, description="Ray accelerator type of the device's node, if any.")
    cpus: float = Field(0.0, ge=0, description="CPUs of a CPU device's node (what an autoscaler bundle for it asks).")


class ModelDemand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    kind: Literal["cuda", "cpu"] = "cuda"
    replicas: int = Field(ge=0)
    share: float = Field(gt=0, le=1.0, description="Device share per replica (1/N).")
    memory_per_replica_bytes: int = Field(gt=0)
    device_type: Optional[str] = Field(None, description="Only devices of this type (any device of the kind if None).")

    def fits_on(self, device: DeviceCapacity) -> bool:
        return device.kind == self.kind and (self.device_type is None or device.device_type == self.device_type)


class PlacedReplicas(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    replicas: int
    share: float
    memory_bytes: int = Field(description="Memory of all these replicas together.")


class Unplaced(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    replicas: int
    reason: str


class PackInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    devices: list[DeviceCapacity]
    models: list[ModelDemand]

    @model_validator(mode="after")
    def _unique(self) -> "PackInput":
        for what, names in (("device", [d.name for d in self.devices]), ("model", [m.model for m in self.models])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
        return self


class PackResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    placement: dict[str, list[PlacedReplicas]] = Field(description="Device name -> replicas on it.")
    devices_used: int
    lower_bound: int = Field(description="Fewest devices any packing needs (capacity bound).")
    unplaced: list[Unplaced]


class _Bin:
    __slots__ = ("device", "share_left", "memory_left", "items")

    def __init__(self, device: DeviceCapacity):
        self.device = device
        self.share_left = device.share
        self.memory_left = device.memory_bytes
        self.items: dict[str, PlacedReplicas] = {}

    def room_for(self, d: ModelDemand) -> int:
        by_share = math.floor((self.share_left + EPS) / d.share)
        return max(0, min(by_share, self.memory_left // d.memory_per_replica_bytes))

    def put(self, d: ModelDemand, n: int) -> None:
        self.share_left -= n * d.share
        self.memory_left -= n * d.memory_per_replica_bytes
        prev = self.items.get(d.model)
        count = n + (prev.replicas if prev else 0)
        self.items[d.model] = PlacedReplicas(model=d.model, replicas=count, share=round(count * d.share, 9),
                                             memory_bytes=count * d.memory_per_replica_bytes)

    def slack(self) -> float:
        return self.share_left / self.device.share + self.memory_left / self.device.memory_bytes


def _size(d: ModelDemand, devices: list[DeviceCapacity]) -> float:
    """How much of the largest device it may use one replica takes (largest first packs best)."""
    largest = next((dev for dev in devices if d.fits_on(dev)), None)
    if largest is None:
        return 0.0
    return max(d.share / largest.share, d.memory_per_replica_bytes / largest.memory_bytes)


def pack(spec: PackInput) -> PackResult:
    placement: dict[str, list[PlacedReplicas]] = {}
    unplaced: list[Unplaced] = []
    lower = 0
    for kind in ("cuda", "cpu"):
        devices = sorted((d for d in spec.devices if d.kind == kind), key=lambda d: (-d.share, -d.memory_bytes, d.name))
        demands = [m for m in spec.models if m.kind == kind and m.replicas > 0]
        if not demands:
            continue
        lower += _lower_bound(devices, demands)
        free = list(devices)  # unopened, largest first
        used: list[_Bin] = []
        pinned = {m.device_type for m in demands if m.device_type}
        # pinned models first (only their type holds them); the others then take what is left
        for d in sorted(demands, key=lambda m: (m.device_type is None, -_size(m, devices), m.model)):
            eligible = [dev for dev in devices if d.fits_on(dev)]
            if not eligible:
                unplaced.append(Unplaced(model=d.model, replicas=d.replicas, reason=f"no {_devices_of(d)}"))
                continue
            left = d.replicas
            for b in sorted((b for b in used if d.fits_on(b.device)), key=lambda b: (b.slack(), b.device.name)):
                if left == 0:
                    break
                n = min(left, b.room_for(d))
                if n:
                    b.put(d, n)
                    left -= n
            while left:
                # open the largest unopened device (of the demand's type) that holds at least one replica;
                # an unpinned model prefers devices of types no pinned model needs
                order = sorted(range(len(free)), key=lambda k: (d.device_type is None and free[k].device_type in pinned, k))
                i = next((k for k in order if d.fits_on(free[k]) and _Bin(free[k]).room_for(d)), None)
                if i is None:
                    break
                b = _Bin(free.pop(i))
                n = min(left, b.room_for(d))
                b.put(d, n)
                used.append(b)
                left -= n
            if left:
                unplaced.append(Unplaced(model=d.model, replicas=left,
                                         reason=_why(d, eligible, [b for b in used if d.fits_on(b.device)])))
        for b in used:
            placement[b.device.name] = sorted(b.items.values(), key=lambda p: p.model)
    return PackResult(placement=dict(sorted(placement.items())), devices_used=len(placement), lower_bound=lower,
                      unplaced=unplaced)


def _lower_bound(devices: list[DeviceCapacity], demands: list[ModelDemand]) -> int:
    """Fewest of these devices any packing needs: the bound over all of them, or the sum of the
    bounds of the device types that pinned models need (their devices are disjoint), if larger."""
    typed = sorted({d.device_type for d in demands if d.device_type})
    per_type = sum(_capacity_bound([dev for dev in devices if dev.device_type == t],
                                   [d for d in demands if d.device_type == t]) for t in typed)
    return max(_capacity_bound(devices, demands), per_type)


def _capacity_bound(devices: list[DeviceCapacity], demands: list[ModelDemand]) -> int:
    """Fewest of these devices whose summed share and memory cover the demand that fits at all."""
    need_share = sum(m.replicas * m.share for m in demands)
    need_mem = sum(m.replicas * m.memory_per_replica_bytes for m in demands)
    bound = 0
    for dim, need in ((lambda d: d.share, need_share), (lambda d: d.memory_bytes, need_mem)):
        total, k = 0.0, 0
        for dev in sorted(devices, key=dim, reverse=True):
            if total + EPS >= need:
                break
            total += dim(dev)
            k += 1
        bound = max(bound, k)
    return bound


def _devices_of(d: ModelDemand, one: bool = False) -> str:
    """The devices a demand may use, in words: "cuda devices", "cuda device of type 'H100'"."""
    noun = "device" if one else "devices"
    return f"{d.kind} {noun} of type {d.device_type!r}" if d.device_type else f"{d.kind} {noun}"


def _why(d: ModelDemand, devices: list[DeviceCapacity], used: list[_Bin]) -> str:
    biggest = max(devices, key=lambda x: x.memory_bytes)
    if d.memory_per_replica_bytes > biggest.memory_bytes or d.share > biggest.share + EPS:
        return (f"one replica needs share {d.share:g} and {d.memory_per_replica_bytes / 2**30:.2f} GiB; the largest "
                f"{_devices_of(d, one=True)} has {biggest.share:g} and "
                f"{biggest.memory_bytes / 2**30:.2f} GiB")
    free_mem = sum(b.memory_left for b in used)
    return (f"all {len(devices)} {_devices_of(d)} are full (free: {free_mem / 2**30:.2f} GiB in fragments "
            f"smaller than {d.memory_per_replica_bytes / 2**30:.2f} GiB or share {d.share:g}); add devices or "
            f"lower the replica count")
