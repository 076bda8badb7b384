"""What to ask Ray's autoscaler for when the packing lacks devices (pure).

On a cluster whose Ray autoscaler can add nodes (the cluster launcher, KubeRay), a placement that
does not fit is not an error: `devices_needed` packs the demand onto the devices there are plus
as many more devices like the largest of each kind and device type as it takes, and
`resource_request` turns every device that packing uses into one bundle for
`ray.autoscaler.sdk.request_resources`. That call sets the cluster's target size (each call
replaces the last, and devices already there count), so the bundles cover the whole placement,
not only the missing part. A device type becomes the `accelerator_type:<T>` resource the
replicas themselves ask for.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from cluster.inventory import ACCELERATOR_TYPE_PREFIX
from cluster.packing import DeviceCapacity, ModelDemand, PackInput, PackResult, pack

ADDED_PREFIX = "+"  # names of devices the packing added (not in the cluster yet)
ACCELERATOR_TYPE_SHARE = 0.001  # what Ray's `accelerator_type` option asks of the accelerator_type:<T> resource


class MissingDevices(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["cuda", "cpu"]
    device_type: Optional[str] = None
    count: int = Field(ge=1)
    memory_bytes: int = Field(description="Memory assumed for each: the largest device of the group there is.")


class NeededDevices(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    packing: PackResult = Field(description="The packing on the devices there are and the added ones.")
    devices: list[DeviceCapacity] = Field(description="The devices there are, then the added ones.")
    missing: list[MissingDevices] = Field(description="The added devices that the packing uses, by kind and type.")

    def capacities(self) -> list[DeviceCapacity]:
        """The devices there are and the added ones the packing uses (what the cluster will have)."""
        return [d for d in self.devices if not d.name.startswith(ADDED_PREFIX) or d.name in self.packing.placement]


class ResourceRequest(BaseModel):
    """What the builder asked Ray's autoscaler for, as `plateau status` shows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    bundles: list[dict[str, float]] = Field(description="One bundle per device the placement uses.")
    missing: list[MissingDevices]
    at: float = Field(description="Unix time of the request.")


def devices_needed(spec: PackInput, cpu_memory_bytes: Optional[int] = None) -> NeededDevices:
    """The packing on the devices there are plus the fewest added devices (like the largest of each
    kind and type with unplaced demand) that hold all of it; demand that even a new device cannot
    hold stays unplaced. A group with no device at all gets devices sized to hold one replica per
    share of its largest demand (their real size is unknown until a node joins)."""
    result, devices = pack(spec), list(spec.devices)
    added: dict[tuple[str, Optional[str]], list[DeviceCapacity]] = {}
    by_model = {m.model: m for m in spec.models}
    limit = sum(m.replicas for m in spec.models)
    while result.unplaced:
        grew = False
        for u in result.unplaced:
            d = by_model[u.model]
            group = (d.kind, d.device_type)
            template = _template(spec, d, cpu_memory_bytes)
            extra = added.setdefault(group, [])
            if len(extra) < limit and template.memory_bytes >= d.memory_per_replica_bytes:
                label = f"{d.kind}-{d.device_type}" if d.device_type else d.kind
                extra.append(template.model_copy(update={"name": f"{ADDED_PREFIX}{label}-{len(extra)}"}))
                grew = True
        if not grew:
            break
        devices = spec.devices + [dev for devs in added.values() for dev in devs]
        result = pack(PackInput(devices=devices, models=spec.models))
    missing = []
    for (kind, device_type), devs in sorted(added.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        used = [d for d in devs if d.name in result.placement]
        if used:
            missing.append(MissingDevices(kind=kind, device_type=device_type, count=len(used),
                                          memory_bytes=used[0].memory_bytes))
    return NeededDevices(packing=result, devices=devices, missing=missing)


def _template(spec: PackInput, d: ModelDemand, cpu_memory_bytes: Optional[int]) -> DeviceCapacity:
    eligible = [dev for dev in spec.devices if d.fits_on(dev)]
    if eligible:
        return max(eligible, key=lambda dev: (dev.memory_bytes, dev.share))
    largest = max((m for m in spec.models if m.kind == d.kind and m.device_type == d.device_type),
                  key=lambda m: m.memory_per_replica_bytes / m.share)
    memory = cpu_memory_bytes if d.kind == "cpu" and cpu_memory_bytes else \
        int(round(largest.memory_per_replica_bytes / largest.share))
    return DeviceCapacity(name="template", kind=d.kind, memory_bytes=memory, device_type=d.device_type)


def resource_request(needed: NeededDevices, cpus_per_cpu_device: float, at: float) -> ResourceRequest:
    """One bundle per device the packing uses: a GPU (of its type), or a CPU node's CPUs."""
    by_name = {d.name: d for d in needed.devices}
    bundles = [device_bundle(by_name[name].kind, by_name[name].device_type, cpus_per_cpu_device)
               for name in needed.packing.placement]
    return ResourceRequest(bundles=bundles, missing=needed.missing, at=at)


def device_bundle(kind: str, device_type: Optional[str], cpus_per_cpu_device: float) -> dict[str, float]:
    bundle: dict[str, float] = {"GPU": 1.0} if kind == "cuda" else {"CPU": float(cpus_per_cpu_device)}
    if device_type:
        bundle[f"{ACCELERATOR_TYPE_PREFIX}{device_type}"] = ACCELERATOR_TYPE_SHARE
    return bundle


def describe(missing: list[MissingDevices]) -> str:
    return ", ".join(f"{m.count} {m.kind} device(s)" + (f" of type {m.device_type!r}" if m.device_type else "")
                     + f" of {m.memory_bytes / 2**30:.1f} GiB" for m in missing)
