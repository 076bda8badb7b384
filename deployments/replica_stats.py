"""Live statistics of one replica: load, token rate, context length, KV usage and decode steps.

Fed by the replica's request loop (tokens, context lengths) and by a vLLM stat logger (scheduler
and iteration stats after every engine step). Read by `record_autoscaling_stats()` and the
metrics gauges. Time comes in as an argument so the arithmetic is testable without clocks.

The decode-step numbers are what the policy compares with the profile's step model: only engine
steps that decoded and prefilled nothing count (the profile's step model is fitted on such steps),
timed by the engine core's own output timestamps. The token rate mixes in prefill time and the
batch is an instant reading, so neither is a step time: at a load change (a wave of prompts
arriving) they disagree with any step model.

It also tells a stalled engine (`stall_verdict`): vLLM calls the stat logger from the replica's
output handler once per engine step that had work, so the time of its last call is the engine's
last step; an engine process that stopped (SIGSTOP, a hung kernel, a deadlock) makes none. The
request wrapper counts the requests waiting for the engine's next output. Requests waiting and no
step for the stall limit is a stall; an idle engine, or one whose requests all sit with slow
clients, waits for nothing and is never stalled.
"""

from __future__ import annotations

import itertools
import statistics
import threading
from collections import deque
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


# A stall is no engine step for max(the model's `stall_timeout_s`, this many times the longest step
# the engine took so far). The floor covers the steps there is no reading of yet (a first long
# prefill: a 1500-token prompt's step takes several seconds for SmolLM2 on one core of the 2-core
# VM, a step is at most vLLM's max_num_batched_tokens); the factor stretches the limit for a big
# model on a slow device once it showed its long steps.
STALL_STEP_FACTOR = 10.0


def stall_limit(floor_s: float, longest_step_s: float) -> float:
    """Seconds without an engine step that make a stall."""
    return max(floor_s, STALL_STEP_FACTOR * longest_step_s)


def stall_verdict(now: float, last_step_at: Optional[float], in_flight: int, started_at: Optional[float],
                  limit_s: float) -> Optional[str]:
    """Why the engine counts as stalled, or None. `in_flight`: requests waiting for the engine's
    next output, the first of them since `started_at`; `last_step_at`: the engine's last step (None:
    none yet). The quiet time runs from the later of the two: an engine idle for an hour is not
    stalled the moment a request arrives."""
    if in_flight <= 0 or started_at is None:
        return None
    since = started_at if last_step_at is None else max(last_step_at, started_at)
    quiet = now - since
    if quiet < limit_s:
        return None
    return (f"the vLLM engine made no step for {quiet:.0f} s while {in_flight} request(s) waited for it "
            f"(stall limit {limit_s:.0f} s)")


def stalled_error(verdict: str) -> Exception:
    """What a request of a stalled engine ends with: vLLM's retryable 503, which its serving layer
    turns into its error body, or into its SSE error event and `data: [DONE]` mid-stream."""
    from vllm.exceptions import RetryableRequestError

    return RetryableRequestError(f"{verdict}; this replica is being replaced, retry the request")


class ReplicaStatsSnapshot(BaseModel):
    """One reading of a replica's load. Keys of `as_metrics()` are the autoscaling signal names."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    running_requests: float = Field(description="Sequences the engine is decoding now.")
    waiting_requests: float = Field(description="Requests queued inside the engine.")
    ongoing_requests: float = Field(description="Requests this replica holds (any state).")
    tokens_per_s: float = Field(description="Generated tokens per second over the rate window.")
    mean_context_tokens: float = Field(description="Mean prompt+generated tokens of ongoing requests.")
    kv_usage: float = Field(description="Share of the KV pool in use, 0..1.")
    preemptions_total: float = Field(description="Sequences the engine preempted since start.")
    recent_requests: float = Field(0.0, description="Requests finished within the shape window.")
    recent_prompt_tokens: float = Field(0.0, description="Mean prompt tokens of those requests (0 if none).")
    recent_output_tokens: float = Field(0.0, description="Mean generated tokens of those requests (0 if none).")
    recent_output_tokens_sq: float = Field(0.0, description="Mean of their generated tokens squared (0 if none): the "
                                                            "spread of the output lengths, cv^2 = this / mean^2 - 1.")
    decode_steps: float = Field(0.0, description="Engine steps within the rate window that only decoded.")
    decode_batch: float = Field(0.0, description="Mean sequences per such step (0 if none).")
    decode_step_ms: float = Field(0.0, description="Mean duration of such a step, engine core timestamps (0 if none).")

    def as_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.model_dump().items()}


class ReplicaStats:
    """Thread-safe accumulator (vLLM calls the stat logger from its output-handler task)."""

    def __init__(self, rate_window_s: float = 10.0, shape_window_s: float = 60.0):
        self._window = rate_window_s
        self._shape_window = shape_window_s
        self._finished: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, output tokens)
        self._prompt: dict[str, int] = {}
        self._lock = threading.Lock()
        self._token_events: deque[tuple[float, int]] = deque()
        self._decode: deque[tuple[float, int, float]] = deque()  # (time, sequences, step seconds)
        self._context: dict[str, int] = {}
        self._running = 0
        self._waiting = 0
        self._kv_usage = 0.0
        self._preemptions = 0
        self._last_step_at: Optional[float] = None
        self._busy_after_step = False  # the last step left work: the engine steps again at once
        self._longest_step = 0.0
        self._waits: dict[int, float] = {}  # requests waiting for the engine's next output -> since when
        self._wait_ids = itertools.count()
        self.stalled: Optional[str] = None  # the verdict, once the replica declared its engine stalled

    @property
    def running(self) -> int:
        """Sequences the engine decodes now (its scheduler's last reading)."""
        return self._running

    def on_step(self, now: float, busy: bool) -> None:
        """The engine made a step; `busy`: it left requests running or waiting, so the time to the
        next step is one step's duration (after an idle engine's step it is idle time)."""
        with self._lock:
            if self._last_step_at is not None and self._busy_after_step:
                self._longest_step = max(self._longest_step, now - self._last_step_at)
            self._last_step_at, self._busy_after_step = now, busy

    def wait_begins(self, now: float) -> int:
        """A request waits for the engine's next output; returns the token for `wait_ends`."""
        token = next(self._wait_ids)
        with self._lock:
            self._waits[token] = now
        return token

    def wait_ends(self, token: int) -> None:
        with self._lock:
            self._waits.pop(token, None)

    def stall(self, now: float, floor_s: float) -> Optional[str]:
        """`stall_verdict` of the engine now, with the limit `stall_limit(floor_s, longest step)`."""
        with self._lock:
            started = min(self._waits.values(), default=None)
            return stall_verdict(now, self._last_step_at, len(self._waits), started,
                                 stall_limit(floor_s, self._longest_step))

    def on_scheduler(self, running: int, waiting: int, kv_usage: float, preempted: int = 0) -> None:
        with self._lock:
            self._running, self._waiting, self._kv_usage = running, waiting, kv_usage
            self._preemptions += preempted

    def on_decode_step(self, now: float, sequences: int, step_s: float) -> None:
        """An engine step that prefilled nothing: `sequences` each got a token; it took `step_s`."""
        if sequences <= 0 or step_s <= 0:
            return
        with self._lock:
            self._decode.append((now, sequences, step_s))
            self._trim(now)

    def on_tokens(self, now: float, request_id: str, new_tokens: int, context_tokens: int) -> None:
        with self._lock:
            if new_tokens:
                self._token_events.append((now, new_tokens))
            self._context[request_id] = context_tokens
            self._trim(now)

    def on_start(self, request_id: str, prompt_tokens: int) -> None:
        with self._lock:
            self._context[request_id] = prompt_tokens
            self._prompt[request_id] = prompt_tokens

    def on_finish(self, request_id: str, now: Optional[float] = None, output_tokens: int = 0) -> None:
        """A request left the replica; with `now`, it also counts toward the live workload shape."""
        with self._lock:
            self._context.pop(request_id, None)
            prompt = self._prompt.pop(request_id, None)
            if now is not None and prompt is not None and output_tokens > 0:
                self._finished.append((now, prompt, output_tokens))
                self._trim(now)

    def snapshot(self, now: float) -> ReplicaStatsSnapshot:
        with self._lock:
            self._trim(now)
            tokens = sum(n for _, n in self._token_events)
            ctx = list(self._context.values())
            done = len(self._finished)
            steps = len(self._decode)
            return ReplicaStatsSnapshot(
                running_requests=self._running,
                waiting_requests=self._waiting,
                ongoing_requests=len(ctx),
                tokens_per_s=tokens / self._window,
                mean_context_tokens=(sum(ctx) / len(ctx)) if ctx else 0.0,
                kv_usage=self._kv_usage,
                preemptions_total=self._preemptions,
                recent_requests=done,
                recent_prompt_tokens=sum(p for _, p, _ in self._finished) / done if done else 0.0,
                recent_output_tokens=sum(o for _, _, o in self._finished) / done if done else 0.0,
                recent_output_tokens_sq=sum(o * o for _, _, o in self._finished) / done if done else 0.0,
                decode_steps=steps,
                decode_batch=sum(n for _, n, _ in self._decode) / steps if steps else 0.0,
                decode_step_ms=1000.0 * sum(t for _, _, t in self._decode) / steps if steps else 0.0,
            )

    def _trim(self, now: float) -> None:
        cutoff = now - self._window
        while self._token_events and self._token_events[0][0] < cutoff:
            self._token_events.popleft()
        while self._decode and self._decode[0][0] < cutoff:
            self._decode.popleft()
        shape_cutoff = now - self._shape_window
        while self._finished and self._finished[0][0] < shape_cutoff:
            self._finished.popleft()


def decode_step(iteration_stats) -> Optional[tuple[int, float]]:
    """(sequences, seconds) of an engine step that only decoded, from vLLM's `IterationStats`; None
    for a step that prefilled (a prompt finished its prefill in it) or decoded nothing. Each decoding
    sequence's inter-token latency is the time from the engine core's previous output to this one:
    the step's duration, scheduling included."""
    if iteration_stats is None or iteration_stats.num_prompt_tokens or iteration_stats.time_to_first_tokens_iter:
        return None
    itls = iteration_stats.inter_token_latencies_iter
    if not itls:
        return None
    return len(itls), statistics.median(itls)


def stat_logger_factory(stats: ReplicaStats, clock=None):
    """A vLLM `StatLoggerFactory` whose loggers feed `stats` with the scheduler's numbers and the
    engine's decode steps."""
    import time

    from vllm.v1.metrics.loggers import StatLoggerBase

    clock = clock or time.monotonic

    class _Collector(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self._stats = stats

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            # one call per engine step that had work; `busy`: it left some, so it steps again at once
            busy = bool(scheduler_stats and scheduler_stats.num_running_reqs + scheduler_stats.num_waiting_reqs)
            self._stats.on_step(clock(), busy)
            if (step := decode_step(iteration_stats)) is not None:
                self._stats.on_decode_step(clock(), *step)
            if scheduler_stats is None:
                return
            preempted: Optional[int] = getattr(iteration_stats, "num_preempted_reqs", 0) if iteration_stats else 0
            self._stats.on_scheduler(
                scheduler_stats.num_running_reqs,
                scheduler_stats.num_waiting_reqs,
                scheduler_stats.kv_cache_usage,
                int(preempted or 0),
            )

        def log_engine_initialized(self):
            pass

    return _Collector


def track_requests(engine, stats: ReplicaStats, clock=None) -> None:
    """Feed `stats` from every request `engine` runs: wraps the engine's `generate`, which vLLM's
    serving layer calls for completions and chat alike (prompt length, new tokens, context, end,
    and the time each waits for the engine's next output). Once the replica declared the engine
    stalled (`stats.stalled`), a request fails with `stalled_error` instead: at once when it
    arrives, and where vLLM's generate fails (the replica puts an error into every request's
    output queue) with the verdict rather than vLLM's bare `EngineGenerateError`."""
    import time

    from vllm.sampling_params import RequestOutputKind

    clock = clock or time.monotonic
    inner = engine.generate

    async def generate(prompt, sampling_params, request_id, *args, **kwargs):
        if stats.stalled is not None:
            raise stalled_error(stats.stalled)
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        per_choice: dict[int, int] = {}
        prompt_len = None
        outputs = inner(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            while True:
                wait = stats.wait_begins(clock())
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    if stats.stalled is not None:
                        raise stalled_error(stats.stalled) from exc
                    raise
                finally:
                    stats.wait_ends(wait)
                if prompt_len is None:
                    prompt_len = len(out.prompt_token_ids or ())
                    stats.on_start(request_id, prompt_len)
                before = sum(per_choice.values())
                for o in out.outputs:
                    per_choice[o.index] = per_choice.get(o.index, 0) + len(o.token_ids) if delta else len(o.token_ids)
                total = sum(per_choice.values())
                stats.on_tokens(clock(), request_id, total - before, prompt_len + max(per_choice.values(), default=0))
                yield out
        finally:
            generated = max(per_choice.values(), default=0)
            stats.on_finish(request_id, clock() if prompt_len is not None else None, generated)

    engine.generate = generate
