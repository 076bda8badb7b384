"""Factories with defaults for the data models the tests build."""

from __future__ import annotations

from deployments.spec import ReplicaResources, ReplicaSpec


def make_spec(**overrides) -> ReplicaSpec:
    fields = dict(
        served_name="smollm2-135m",
        model_path="/models/smollm2",
        device_kind="cpu",
        replicas_per_device=2,
        resources=ReplicaResources(num_gpus=0.0, num_cpus=1.0),
        max_num_seqs=32,
        kv_cache_bytes=256 << 20,
        max_model_len=2048,
        dtype="float32",
        enforce_eager=True,
    )
    fields.update(overrides)
    return ReplicaSpec(**fields)


def step_ms(batch: int, ctx: float, a: float = 20.0, b: float = 0.3, c: float = 0.002) -> float:
    """Synthetic decode step time of a bandwidth-bound engine (ms)."""
    return a + b * batch + c * batch * ctx


class FakeRunner:
    """A `BatchRunner` whose timings follow `step_ms`; records the batches it was asked for."""

    def __init__(self, max_batch: int = 256, **step_kwargs):
        self.max_batch = max_batch
        self.calls: list[int] = []
        self.step_kwargs = step_kwargs

    def run(self, batch, shape):
        from advisor.profiler import BatchMeasurement

        self.calls.append(batch)
        t = step_ms(batch, shape.context_tokens, **self.step_kwargs)
        wall = (shape.output_tokens * t + 50) / 1000
        window_tokens = batch * (shape.output_tokens - 2)
        return BatchMeasurement(batch=batch, wall_s=wall, output_tokens=batch * shape.output_tokens,
                                ttft_ms=[50.0] * batch, tpot_ms=[t] * batch, kv_usage_peak=min(1.0, batch / 300),
                                decode_window_s=(shape.output_tokens - 2) * t / 1000, decode_window_tokens=window_tokens)


def make_profile(runner=None, shape=None, rules=None, **overrides):
    from advisor.plateau import PlateauRules
    from advisor.profiler import WorkloadShape, build_profile

    runner = runner or FakeRunner()
    fields = dict(model="m", device_name="dev", engine_version="0.0", dtype="bfloat16",
                  weight_bytes=270_000_000, kv_bytes_per_token=23040, overhead_bytes=1 << 30)
    fields.update(overrides)
    return build_profile(runner, shape or WorkloadShape(), rules or PlateauRules(tpot_growth_limit=50), **fields)


def second_writer_waits(hold, while_held=None, wait_s: float = 0.3) -> bool:
    """Whether a second writer taking the lock `hold()` (a context manager factory) in another thread
    gets it only after the first holder lets go; `while_held()` runs inside the first hold."""
    import threading
    import time

    order = []

    def second_writer():
        with hold():
            order.append("second")
    with hold():
        if while_held is not None:
            while_held()
        t = threading.Thread(target=second_writer)
        t.start()
        time.sleep(wait_s)
        order.append("first released")
    t.join(10)
    return order == ["first released", "second"]
