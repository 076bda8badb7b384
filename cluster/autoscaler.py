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


def devices_needed(spec: PackInput) -> NeededDevices:
    """The packing on the devices there are plus the fewest added devices (like the largest of each
    kind and type with unplaced demand) that hold all of it; demand that even a new device cannot
    hold, or whose kind and type the cluster has no device of (its size is unknown), stays unplaced."""
    result, devices = pack(spec), list(spec.devices)
    added: dict[tuple[str, Optional[str]], list[DeviceCapacity]] = {}
    taken = {dev.name for dev in spec.devices}  # the policy's devices may hold earlier added ones
    by_model = {m.model: m for m in spec.models}
    limit = sum(m.replicas for m in spec.models)
    while result.unplaced:
        grew = False
        for u in result.unplaced:
            d = by_model[u.model]
            group = (d.kind, d.device_type)
            template = _template(spec, d)
            extra = added.setdefault(group, [])
            if template is not None and len(extra) < limit and template.memory_bytes >= d.memory_per_replica_bytes:
                extra.append(template.model_copy(update={"name": _added_name(d, taken)}))
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


def _added_name(d: ModelDemand, taken: set[str]) -> str:
    """A new name `+<kind>[-<type>]-<i>` for an added device, apart from every name in `taken` (which it joins)."""
    label = f"{d.kind}-{d.device_type}" if d.device_type else d.kind
    i = 0
    while f"{ADDED_PREFIX}{label}-{i}" in taken:
        i += 1
    taken.add(f"{ADDED_PREFIX}{label}-{i}")
    return f"{ADDED_PREFIX}{label}-{i}"


def _template(spec: PackInput, d: ModelDemand) -> Optional[DeviceCapacity]:
    """The largest device the demand may use (None: the cluster has none of its kind and type)."""
    eligible = [dev for dev in spec.devices if d.fits_on(dev)]
    return max(eligible, key=lambda dev: (dev.memory_bytes, dev.share)) if eligible else None


def resource_request(needed: NeededDevices, at: float) -> ResourceRequest:
    """One bundle per device the packing uses: a GPU (of its type), or a CPU node's CPUs."""
    by_name = {d.name: d for d in needed.devices}
    return ResourceRequest(bundles=[device_bundle(by_name[name]) for name in needed.packing.placement],
                           missing=needed.missing, at=at)


def device_bundle(device: DeviceCapacity) -> dict[str, float]:
    """What one device is to the autoscaler: a GPU, or a CPU node's CPUs; with its accelerator type."""
    bundle: dict[str, float] = {"GPU": 1.0} if device.kind == "cuda" else {"CPU": float(device.cpus)}
    if device.device_type:
        bundle[f"{ACCELERATOR_TYPE_PREFIX}{device.device_type}"] = ACCELERATOR_TYPE_SHARE
    return bundle


def describe(missing: list[MissingDevices]) -> str:
    return ", ".join(f"{m.count} {m.kind} device(s)" + (f" of type {m.device_type!r}" if m.device_type else "")
                     + f" of {m.memory_bytes / 2**30:.1f} GiB" for m in missing)
