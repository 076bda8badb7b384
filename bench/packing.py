"""Packer scale: 1,000 devices x 200 models, timed, with devices used vs the capacity lower bound.

Devices: a mix of 80 GiB and 141 GiB GPUs. Models: replicas 1..8 each (about 40% of the fleet), share 1/N with N in
{1, 2, 3, 4, 8}, memory per replica 2..70 GiB (deterministic seed). Target: under 1 s.

    python bench/packing.py [--devices 1000] [--models 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from cluster.packing import DeviceCapacity, ModelDemand, PackInput, pack  # noqa: E402

GIB = 2**30


def workload(n_devices: int, n_models: int, seed: int) -> PackInput:
    rng = random.Random(seed)
    devices = [DeviceCapacity(name=f"node{i // 8:03d}/gpu{i % 8}", memory_bytes=rng.choice([80, 141]) * GIB)
               for i in range(n_devices)]
    models = []
    for i in range(n_models):
        n = rng.choice([1, 2, 3, 4, 8])
        mem = rng.randint(2, min(70, 80 * 2 // n)) * GIB
        models.append(ModelDemand(model=f"model{i:03d}", replicas=rng.randint(1, 8), share=1 / n,
                                  memory_per_replica_bytes=mem))
    return PackInput(devices=devices, models=models)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()
    spec = workload(ns.devices, ns.models, ns.seed)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = pack(spec)
        runs.append(time.perf_counter() - t0)
    replicas = sum(m.replicas for m in spec.models)
    placed = replicas - sum(u.replicas for u in result.unplaced)
    row = {"devices": ns.devices, "models": ns.models, "replicas": replicas, "placed": placed,
           "seconds_best": round(min(runs), 4), "seconds_all": [round(r, 4) for r in runs],
           "devices_used": result.devices_used, "lower_bound": result.lower_bound,
           "over_lower_bound": result.devices_used - result.lower_bound, "target_seconds": 1.0}
    print(" ".join(f"{k}={v}" for k, v in row.items()))
    print(f"wrote {write_result('packing', row)}")


if __name__ == "__main__":
    main()
