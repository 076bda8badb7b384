"""The LLM replica deployment: one vLLM `AsyncLLM` engine behind a Ray Serve replica.

Requests are answered by vLLM's own OpenAI serving layer over the replica's engine
(`deployments/vllm_api.py`). With Ray's HAProxy on, the replica runs its own HTTP server
(`deployments/replica_front.py`) that HAProxy sends requests to directly, and tells the routers
what it holds (`ReplicaReport`, through the status board); its stop drains that server first.
Without it, and for the Python API, requests come through the ingress: HTTP requests (`http`) and
the same serving calls on vLLM's request types (`completions`, `chat`, their `*_stream` forms).
The replica owns what vLLM's server does not: the engine's cores and memory share, the health
check (fails once the engine process is gone or stalled), a dead engine reported as retryable (and
the replica ending its own process a second later, so routers stop choosing it at once), and the
load signals (`record_autoscaling_stats()` plus the same values as `ray.serve.metrics` gauges).
A stalled engine (requests wait for it and it made no step for the stall limit:
`replica_stats.stall_verdict`; a stopped or hung EngineCore process, which vLLM never notices) is
treated as dead: its requests end with vLLM's error (an SSE error event and `data: [DONE]` in a
stream), those that had produced nothing are sent elsewhere, and the replica exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator, Optional

import ray
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.metrics import Gauge

from cluster.board import find_board, get_or_create_board
from cluster.routing import ReplicaReport
from deployments.cores import claim_cores, usable_cores
from deployments.direct_path import ReplicaPort, haproxy_enabled
from deployments.engine import EngineDead, engine_core_pids, serve_log_targets_kept, start_engine, vllm_version
from deployments.reaper import ensure_reaper
from deployments.models import resolve_on_node
from deployments.asgi import HttpItem, HttpRequest, HttpStart, call_asgi
from deployments.replica_front import FrontServer, FrontSettings, ReplicaFront
from deployments.replica_stats import (ReplicaStats, ReplicaStatsSnapshot, stalled_error, stat_logger_factory,
                                      track_requests)
from deployments.vllm_api import build_openai_app
from deployments.spec import ReplicaSpec

logger = logging.getLogger("ray.serve")

GAUGE_PERIOD_S = 2.0
ENGINE_WATCH_S = 0.5  # how often the replica checks that its engine lives and steps
DEAD_ENGINE_EXIT_GRACE_S = 1.0  # in-flight streams end with their error events, then the replica exits
DEAD_ENGINE_HAND_OVER_S = 60.0  # longest wait for requests a dead engine's replica handed over to finish
REPORT_EVERY_S = 0.25  # at most this often a replica tells the routers what it holds
REPORT_KEEPALIVE_S = 2.0  # and at least this often (a report older than REPORT_STALE_S drops it from routing)
# A stopping replica's own server keeps answering for this long after the routers were told, so
# HAProxy has reloaded without it before it closes (Ray's ingress replicas wait the same way:
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S).
FRONT_DRAIN_MIN_S = 2.0
# Serve kills a replica `graceful_shutdown_timeout_s` (engine.deployment_options: 30 s) after its stop
# began, and spends a few of them on its own requests first: the replica's streams get up to this long.
FRONT_DRAIN_MAX_S = 20.0
_GAUGES = {
    "running_requests": "Sequences the vLLM engine is decoding now.",
    "waiting_requests": "Requests queued inside the vLLM engine.",
    "ongoing_requests": "Requests the replica holds.",
    "tokens_per_s": "Generated tokens per second (10 s window).",
    "mean_context_tokens": "Mean prompt+generated tokens of ongoing requests.",
    "kv_usage": "Share of the replica's KV pool in use (0..1).",
    "preemptions_total": "Sequences preempted by the engine since start.",
    "recent_requests": "Requests finished in the shape window (policy.shape_window_s, 60 s by default).",
    "recent_prompt_tokens": "Mean prompt tokens of requests finished in the shape window.",
    "recent_output_tokens": "Mean generated tokens of requests finished in the shape window.",
    "recent_output_tokens_sq": "Mean squared generated tokens of requests finished in the shape window (length spread).",
    "decode_steps": "Engine steps that only decoded (10 s window).",
    "decode_batch": "Mean sequences per decode-only engine step (10 s window).",
    "decode_step_ms": "Mean duration of a decode-only engine step, ms (10 s window).",
}


class ReplicaInfo(BaseModel):
    """What a replica is, where its engine runs and what it is doing now (for status pages and fault
    tests): one call, so the stats are this replica's own and not those of whichever replica Serve
    routes the next call to."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replica_id: str
    pid: int
    served_name: str
    model_path: str
    device_kind: str
    cpu_cores: Optional[list[int]]
    engine_pids: list[int]
    num_kv_blocks: Optional[int]
    kv_block_tokens: Optional[int]
    max_model_len: int
    vllm_version: str
    stats: ReplicaStatsSnapshot


def replica_stats(spec: ReplicaSpec) -> ReplicaStats:
    """The replica's load and shape readings, its live shape over the policy's window (in the spec)."""
    return ReplicaStats(shape_window_s=spec.shape_window_s)


class LLMReplica:
    """Serve deployment class; `deployments/app.py` binds it with the options `engine.deployment_options` makes from the spec."""

    async def __init__(self, spec: ReplicaSpec, front: Optional[FrontSettings] = None):
        """`front`: the app's API key and default model, for the replica's own HTTP server (started
        when Ray runs HAProxy: the direct data path)."""
        self._stopping = False  # set by Serve's graceful stop: the engine's shutdown is then no death
        self.front: Optional[ReplicaFront] = None
        path = await asyncio.to_thread(resolve_on_node, spec.model_path, ray.util.get_node_ip_address())
        self.spec = spec.model_copy(update={"model_path": str(path)})
        self.stats = replica_stats(spec)
        self.cores: Optional[list[int]] = None
        if spec.device_kind == "cpu":
            # a slice of the node's cores no other engine on the node holds (any model, any variant)
            node = usable_cores()  # the affinity capped by a container's CPU quota
            self.cores = claim_cores(max(1, len(node) // spec.replicas_per_device), node)
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        # our load signals, and vLLM's own engine metrics (`vllm:*`) in Ray's metrics export
        with serve_log_targets_kept():  # vLLM's logging setup must not break Serve's replica logger
            ensure_reaper()  # the engine dies with this replica or its raylet, however they end, from its start on
            self.engine = start_engine(self.spec, self.cores, [stat_logger_factory(self.stats), RayPrometheusStatLogger])
            self.max_model_len = int(self.engine.model_config.max_model_len)
            track_requests(self.engine, self.stats)
            self.app = await build_openai_app(self.engine, self.spec)
        self._gauges = {}
        for name, desc in _GAUGES.items():
            g = Gauge(f"plateau_replica_{name}", description=desc, tag_keys=("model",))
            g.set_default_tags({"model": spec.served_name})  # Serve adds its tags into this dict
            self._gauges[name] = g
        # On a GPU: the device's DRAM bandwidth use (NVML GPM) over each gauge period. Replicas
        # sharing a GPU report the same device-wide number.
        self._sampler = _device_sampler() if spec.device_kind == "cuda" else None
        if self._sampler is not None:
            g = Gauge("plateau_replica_device_dram_bw_util", description="DRAM bandwidth use of the replica's GPU, % "
                      "of peak (NVML GPM).", tag_keys=("model",))
            g.set_default_tags({"model": spec.served_name})
            self._gauges["device_dram_bw_util"] = g
            self._sampler.start()
        self._gauge_task = asyncio.get_running_loop().create_task(self._publish_gauges())
        self._engine_watch = asyncio.get_running_loop().create_task(self._exit_when_engine_dies())
        port = await self._start_front(front) if front is not None and haproxy_enabled() else None
        logger.info("replica of %s ready: cores=%s max_model_len=%d%s", spec.served_name, self.cores,
                    self.max_model_len, f", own HTTP server on port {port}" if port else "")

    # ---- the direct data path: the replica's own HTTP server ---------------------------------
    async def _start_front(self, settings: FrontSettings) -> int:
        ctx = serve.get_replica_context()
        node_id = ray.get_runtime_context().get_node_id()
        self._identity = (ctx.app_name, ctx.deployment, ctx.replica_id.to_full_id_str())
        self._ingress = None  # the ingress's handle, for what this server hands over (made on first use)
        self.front = ReplicaFront(self.app, self.spec.served_name, settings.default_model, settings.api_key,
                                  relay=lambda req: self._hand_over(settings.ingress, req),
                                  engine_dead=self._engine_gone, limits=settings.limits)
        self._front_server = FrontServer(ReplicaPort(ctx.replica_id.unique_id, node_id))
        port = await self._front_server.start(self.front)
        self._where = (node_id, ctx.replica_id.unique_id, port)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        return port

    def _hand_over(self, ingress: str, req: HttpRequest):
        if self._ingress is None:
            self._ingress = serve.get_deployment_handle(ingress, app_name=self._identity[0])
        return self._ingress.options(stream=True).http.remote(req)

    def _report(self) -> ReplicaReport:
        app, deployment, replica_id = self._identity
        node_id, unique_id, port = self._where
        return ReplicaReport(replica_id=replica_id, model=self.spec.served_name, deployment=deployment,
                             max_num_seqs=self.spec.max_num_seqs, ongoing=self.front.ongoing,
                             received=self.front.received, engine_running=self.stats.running,
                             stopping=not self.front.healthy(), node_id=node_id, unique_id=unique_id, http_port=port,
                             at=time.time())

    async def _report_forever(self) -> None:
        """Tell the routers (through the board) what this replica holds: when it changes, at most
        every REPORT_EVERY_S, and every REPORT_KEEPALIVE_S regardless."""
        board = None
        while True:
            try:
                await asyncio.wait_for(self.front.changed.wait(), timeout=REPORT_KEEPALIVE_S)
            except asyncio.TimeoutError:
                pass
            self.front.changed.clear()
            try:
                board = board or get_or_create_board()
                board.report_replica.remote(self._identity[0], self._report())
            except Exception as exc:  # the board restarts: the next report reaches the new one
                board = None
                logger.debug("replica report failed: %s", exc)
            await asyncio.sleep(REPORT_EVERY_S)

    async def _drain_front(self) -> None:
        """Stop taking requests on the replica's own server and let the ones under way finish (those
        vLLM answers and those handed to the ingress): the routers hear it at once, HAProxy drops the
        server when Serve marks the replica stopping (and its health check fails), and the server
        closes once it holds nothing, at most FRONT_DRAIN_MAX_S after the stop began."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.front.stopping = True
        self.front.changed.set()
        try:
            await asyncio.sleep(FRONT_DRAIN_MIN_S)
            while self.front.busy() and loop.time() - start < FRONT_DRAIN_MAX_S:
                await asyncio.sleep(0.2)
            if self.front.busy():
                logger.warning("replica of %s stops with %d requests still streaming after %.0f s",
                               self.spec.served_name, self.front.ongoing + self.front.relaying, FRONT_DRAIN_MAX_S)
        finally:
            if getattr(self, "_reporter", None) is not None:
                self._reporter.cancel()
            try:
                await self._front_server.stop(timeout_s=2.0)
            finally:
                try:  # never creates a board (or starts Ray): a stopping replica only withdraws its report
                    board = find_board()
                    if board is not None:
                        board.forget_replica.remote(self._identity[0], self._identity[2])
                except Exception:  # the board restarts: the report goes stale instead
                    pass

    # ---- requests -------------------------------------------------------------------------
    async def http(self, request: HttpRequest) -> AsyncIterator[HttpItem]:
        """Serve one OpenAI HTTP request with vLLM's own app: an `HttpStart`, then the body.

        A request that meets a dead engine before any output comes back as a retryable 503, so
        the ingress can send it to another replica; a stream already under way ends the way
        vLLM ends it (an error event). A stalled engine counts as dead."""
        if self._engine_gone():
            yield _engine_dead(ran=False)  # dead before this request came: not its doing
            return
        items = call_asgi(self.app, request)
        try:
            start = await items.__anext__()
            first = await anext(items, None)
            if self._engine_gone() and (start.status >= 500 or (first is not None and b'"error"' in first)):
                yield _engine_dead()
                return
            yield start
            if first is not None:
                yield first
                async for chunk in items:
                    yield chunk
        finally:
            await items.aclose()

    async def completions(self, request) -> object:
        """Python API: a vLLM `CompletionRequest` -> `CompletionResponse` or `ErrorResponse`."""
        return await self._serving_call("openai_serving_completion", "create_completion", request)

    async def chat(self, request) -> object:
        """Python API: a vLLM `ChatCompletionRequest` -> `ChatCompletionResponse` or `ErrorResponse`."""
        return await self._serving_call("openai_serving_chat", "create_chat_completion", request)

    async def completions_stream(self, request) -> AsyncIterator[str]:
        """Python API, `stream=True` requests: the SSE lines vLLM writes (`data: {...}`)."""
        async for line in self._serving_stream("openai_serving_completion", "create_completion", request):
            yield line

    async def chat_stream(self, request) -> AsyncIterator[str]:
        async for line in self._serving_stream("openai_serving_chat", "create_chat_completion", request):
            yield line

    async def _serving_call(self, serving: str, method: str, request) -> object:
        out = await self._serve_python(serving, method, request)
        if not hasattr(out, "__aiter__"):
            return out
        await out.aclose()
        return self._python_error("set stream=False for this method, or call the *_stream method")

    async def _serving_stream(self, serving: str, method: str, request) -> AsyncIterator[str]:
        out = await self._serve_python(serving, method, request)
        if not hasattr(out, "__aiter__"):  # an error, or a non-streaming request
            yield f"data: {out.model_dump_json()}\n\n"
            return
        async for line in out:
            yield line

    async def _serve_python(self, serving: str, method: str, request):
        """vLLM's serving call; `EngineDead` (the ingress sends the request elsewhere) when the engine
        is dead (or stalled) before it produced anything."""
        from vllm.exceptions import VLLMClientError

        if self._engine_gone():  # dead before this request came: not its doing
            raise EngineDead(f"the vLLM engine of {self.spec.served_name!r} is dead or stalled", ran=False)
        handler = getattr(self.app.state, serving)
        try:
            out = await getattr(handler, method)(request, raw_request=None)
        except (ValueError, VLLMClientError) as exc:  # as vLLM's exception handlers answer them
            return handler.create_error_response(exc)
        except Exception as exc:
            if self._engine_gone():
                raise EngineDead(f"the vLLM engine of {self.spec.served_name!r} died or stalled") from exc
            raise
        if self._engine_gone() and getattr(getattr(out, "error", None), "code", 0) >= 500:
            raise EngineDead(f"the vLLM engine of {self.spec.served_name!r} died")  # vLLM's 500 for it
        return out

    def _python_error(self, message: str):
        from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

        return ErrorResponse(error=ErrorInfo(message=message, type="BadRequestError", code=400))

    # ---- health, stats, info ----------------------------------------------------------------
    def _engine_gone(self) -> bool:
        """The engine can answer nothing: its process died, or it stalled."""
        return self.engine.errored or self.stats.stalled is not None

    def _engine_stalled(self, now: float) -> bool:
        """Watch for a stall: a verdict that holds on two checks in a row (a replica event loop that
        was blocked may run this check before the engine outputs that arrived meanwhile) is declared
        (`stats.stalled`), and every request the engine holds fails with it."""
        verdict = self.stats.stall(now, self.spec.stall_timeout_s)
        seen, self._stall_seen = getattr(self, "_stall_seen", None), verdict
        if verdict is None or seen is None:
            return False
        self.stats.stalled = verdict
        self._fail_engine_requests()
        return True

    def _fail_engine_requests(self) -> None:
        """End every request waiting on a stalled engine with `stalled_error`, through vLLM's own
        per-request output queues (what vLLM does when its output handler fails)."""
        processor = getattr(self.engine, "output_processor", None)
        if processor is not None and self.stats.stalled is not None:
            processor.propagate_error(stalled_error(self.stats.stalled))

    async def _exit_when_engine_dies(self) -> None:
        """A replica whose engine died can serve nothing, yet it answers at once (a retryable 503),
        so Serve's routers favour it until three failed health checks (~6 s) retire it, and requests
        retried elsewhere keep landing on it. It ends its own process instead: routers drop a dead
        actor on their next call and the controller replaces it at once. The grace lets in-flight
        streams send their error events first. An engine stopped by Serve's graceful stop (`__del__`)
        is no death: the replica then lets Serve finish the stop (logging the engine dead and exiting
        with status 1 would break every scale-down, re-pack drain and shutdown). A stalled
        engine is a dead one: vLLM never notices a stopped or hung engine process, and its requests
        would wait for good."""
        while not self.engine.errored and not self._engine_stalled(time.monotonic()):
            await asyncio.sleep(ENGINE_WATCH_S)
        stalled = self.stats.stalled
        if self._stopping:
            if stalled is not None:
                logger.error("vLLM engine of %s stalled while the replica stops: %s", self.spec.served_name, stalled)
            return
        logger.error("vLLM engine of %s %s: this replica exits in %.0f s so Serve routes around it and replaces "
                     "it", self.spec.served_name, "died" if stalled is None else f"stalled ({stalled}); its requests "
                     "end with an error", DEAD_ENGINE_EXIT_GRACE_S)
        front = getattr(self, "front", None)
        if front is not None:  # the routers hear it now; its own server takes no new connection
            front.changed.set()
            self._front_server.stop_accepting()
        await asyncio.sleep(DEAD_ENGINE_EXIT_GRACE_S)
        self._fail_engine_requests()  # those that reached the stalled engine after the first round
        if front is not None:  # requests it handed to the ingress stream through this process: let them end
            await self._front_server.wait_closed(DEAD_ENGINE_HAND_OVER_S)
        _end_process()

    async def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine of {self.spec.served_name!r} is dead; Serve will replace this replica")
        if self.stats.stalled is not None:
            raise RuntimeError(f"vLLM engine of {self.spec.served_name!r} stalled: {self.stats.stalled}; Serve will "
                               "replace this replica")

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.stats.snapshot(time.monotonic()).as_metrics()

    def front_counts(self) -> dict[str, int]:
        """Requests the replica's own server gave vLLM's app (`received`), holds now (`ongoing`) and
        handed to the ingress (`relayed`); empty without the direct path."""
        if self.front is None:
            return {}
        return {"received": self.front.received, "ongoing": self.front.ongoing, "relayed": self.front.relayed}

    def get_stats(self) -> ReplicaStatsSnapshot:
        return self.stats.snapshot(time.monotonic())

    def info(self) -> ReplicaInfo:
        cache = self.engine.vllm_config.cache_config
        return ReplicaInfo(
            replica_id=_replica_id(),
            pid=os.getpid(),
            served_name=self.spec.served_name,
            model_path=self.spec.model_path,
            device_kind=self.spec.device_kind,
            cpu_cores=self.cores,
            engine_pids=engine_core_pids(self.engine),
            num_kv_blocks=cache.num_gpu_blocks,
            kv_block_tokens=cache.block_size,
            max_model_len=self.max_model_len,
            vllm_version=vllm_version(),
            stats=self.stats.snapshot(time.monotonic()),
        )

    async def _publish_gauges(self) -> None:
        while True:
            snap = self.stats.snapshot(time.monotonic())
            for name, value in snap.as_metrics().items():
                self._gauges[name].set(value)
            if self._sampler is not None:
                sample = self._sampler.stop()
                self._sampler.start()
                if sample.dram_bw_util is not None:
                    self._gauges["device_dram_bw_util"].set(sample.dram_bw_util)
            await asyncio.sleep(GAUGE_PERIOD_S)

    def __del__(self):
        """Serve's graceful stop (scale-down, re-pack drain, `serve shutdown`): the replica's own
        server drains, then the engine stops. Serve awaits what this returns; the garbage collector,
        which calls it again later, gets nothing to await (and outside an event loop, where nothing
        could drain, the engine stops at once)."""
        if getattr(self, "_stopped", False):
            return None
        self._stopped = self._stopping = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._stop_engine()
            return None
        return self._graceful_stop()

    async def _graceful_stop(self) -> None:
        try:
            if getattr(self, "front", None) is not None:
                await self._drain_front()
        finally:
            self._stop_engine()

    def _stop_engine(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _end_process() -> None:
    logging.shutdown()  # flush the replica's log first
    os._exit(1)


def _engine_dead(ran: bool = True) -> HttpStart:
    """Nothing was produced: the ingress retries elsewhere, or answers 503 itself; `ran`: the engine
    had the request when it died (the ingress counts that death against the request's body)."""
    return HttpStart(status=503, retryable=True, ran=ran)


def _device_sampler():
    """An NVML sampler on the GPU this replica's engine runs on (None without NVML or GPM).

    The engine runs on `cuda:0` as this process sees it: the first entry of the
    `CUDA_VISIBLE_DEVICES` Ray set for the replica. That entry can be an index, a GPU UUID or a
    MIG UUID, and NVML numbers devices physically, so it is mapped to its NVML handle, never int()-ed.
    """
    from advisor.nvml import GpuSelectionError, gpu_sampler

    try:
        sampler = gpu_sampler("cuda:0")
    except GpuSelectionError as exc:
        logger.warning("no device counters for this replica: %s", exc)
        return None
    return sampler if sampler is not None and sampler.gpm else None


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"