"""The Serve side of the autoscaling policy: an application-level policy class for config.yaml.

    applications:
      - name: plateau
        autoscaling_policy:
          policy_function: deployments.autoscale:PlateauAutoscaler
          policy_kwargs: {evaluate_every_s: 1.0}

Serve's controller calls it every ~0.1 s with one `AutoscalingContext` per deployment. It reads
each variant deployment's `ModelPolicyInput` (the builder puts it in that deployment's
`autoscaling_config.policy.policy_kwargs`), turns Serve's counts and the replicas'
`record_autoscaling_stats()` into observations, calls the pure `cluster.policy.decide`, and
publishes routes, readings and decisions to the status board without waiting. Any exception is
logged and the current replica targets are kept: the policy never takes the controller down.

With `cluster_autoscaling`, growth the devices cannot hold goes onto devices Ray's autoscaler
adds: whenever the devices the replica targets use change, the policy asks for all of them
(`ray.autoscaler.sdk.request_resources`, which replaces the builder's start request), so the
cluster grows with load and, once load falls, may shrink with it (down to what the minimums use).

On a fixed cluster the policy reads the cluster's devices again every `policy.device_refresh_s`
(30 s) on a thread of its own, the way the builder read them: growth uses a node that joined after
the deploy, and stops counting on one that left.

The policy's state (re-pack phase, clocks, cooldowns) is written to Ray's internal KV store
whenever it changes and read back on the first tick after a controller restart, so a restart
neither starts a re-pack over nor loses a drain. A read that fails is not "nothing saved": until
the state can be read, every tick keeps the current replica targets and writes nothing (a fresh
state saved over a re-pack would scale its warming variant to zero), and the next tick reads again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.profiler import Profile
from advisor.refit import LiveSample
from cluster.autoscaler import NeededDevices, ResourceRequest, describe, resource_request
from cluster.inventory import DeviceRead, NodeCache, device_changes
from cluster.packing import DeviceCapacity
from cluster.state_store import RayInternalKV, StateStore, policy_key
from cluster.policy import (ModelPolicyInput, ModelView, PolicyConfig, PolicyContext, PolicyState, Route,
                            VariantObservation, decide)

logger = logging.getLogger("ray.serve")

POLICY_KWARGS_KEY = "plateau"
POLICY_FUNCTION = "deployments.autoscale:PlateauAutoscaler"  # what config.yaml names as the app's policy
BOARD_LOOKUP_EVERY_S = 10.0
MIN_DECODE_STEPS = 5  # a replica's decode steps in its rate window before they make a live sample
MEASURED_POLL_S = 10.0  # how often a model on a predicted plan looks for its measured profile


class _VariantInput(BaseModel):
    """One variant deployment's parsed policy kwargs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: ModelPolicyInput
    n: int
    policy: PolicyConfig
    devices: list[DeviceCapacity]
    deploy_id: str = Field("", description="One build of the app: saved policy state is read back only into the "
                                           "same build (a controller restart), never into a new deploy.")
    cluster_autoscaling: bool = Field(False, description="Growth may ask Ray's autoscaler for devices.")
    device_read: Optional[DeviceRead] = Field(None, description="How the builder read the devices, to read them again "
                                              "while the app runs; None: the deploy's devices only.")


class SavedPolicyState(BaseModel):
    """The policy state as written to the state store."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    deploy_id: str = Field(description="The build the state belongs to.")
    state: PolicyState


class PolicyStateUnreadable(RuntimeError):
    """The saved policy state could not be read: the targets are held until it can be."""


def saved_state(raw: Optional[bytes], deploy_id: str) -> tuple[Optional[PolicyState], str]:
    """The state to resume from, read back from the store's bytes `raw` (None: nothing saved), with
    why: only a state saved by this same build is resumed. Bytes that are no saved state are not
    resumed either: reading them again would not change them, so a fresh state replaces them."""
    if not raw:
        return None, "nothing saved"
    try:
        saved = SavedPolicyState.model_validate_json(raw)
    except ValueError as exc:
        return None, f"not a saved policy state ({str(exc).splitlines()[0]})"
    if saved.deploy_id != deploy_id:
        return None, f"saved by another deploy ({saved.deploy_id})"
    return saved.state, "read back"


def policy_kwargs(inp: ModelPolicyInput, n: int, policy: PolicyConfig, devices: list[DeviceCapacity],
                  deploy_id: str = "", cluster_autoscaling: bool = False,
                  device_read: Optional[DeviceRead] = None) -> dict[str, Any]:
    """What the builder attaches to the variant deployment `n` of a model (JSON only). `device_read`
    lets the policy read the devices again; with cluster_autoscaling it is dropped (the devices the
    autoscaler was asked for stand for the nodes it adds)."""
    parsed = _VariantInput(model=inp, n=n, policy=policy, devices=devices, deploy_id=deploy_id,
                           cluster_autoscaling=cluster_autoscaling,
                           device_read=None if cluster_autoscaling else device_read)
    return {POLICY_KWARGS_KEY: parsed.model_dump(mode="json")}


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ray's autoscaler's target: these bundles (it replaces the previous request)."""
    from ray.autoscaler.sdk import request_resources as ray_request_resources

    ray_request_resources(bundles=bundles)


def read_capacities(read: DeviceRead, cache: NodeCache) -> list[DeviceCapacity]:
    """The cluster's devices now; `cache` keeps each node's NVML readings (a GPU node is asked once)
    and its devices' names (they stay when other nodes join)."""
    return read.inventory(cache).capacities()


class DeviceWatch:
    """The cluster's devices, read every `every_s` seconds on a daemon thread (the read calls Ray and
    runs NVML tasks on GPU nodes: never on the controller's event loop). `latest` is None until a
    read succeeds; a failed or empty read keeps the last one. Its owner stops it (Serve drops a
    policy object on redeploy without telling it: the owner stops its watch when it is collected)."""

    def __init__(self, read: Callable[[], list[DeviceCapacity]], every_s: float):
        self._read, self.every_s = read, every_s
        self.latest: Optional[list[DeviceCapacity]] = None
        self._failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plateau-device-watch", daemon=True)

    def start(self) -> "DeviceWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        try:
            devices = self._read()
        except Exception:
            self._failures += 1
            if self._failures <= 5 or self._failures % 100 == 0:
                logger.exception("plateau policy: could not read the cluster's devices (%d times); "
                                 "growth keeps the last reading", self._failures)
            return
        if devices:
            self.latest = devices

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.every_s)


class _Call:
    """One blocking call on a daemon thread of its own (a hung call never holds up the process's exit)."""

    def __init__(self, fn: Callable, *args):
        self.error: Optional[BaseException] = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn, args), daemon=True, name="plateau-autoscaler-ask").start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.error = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()


class MeasuredProfiles:
    """Profiles measured beside serving replicas (a first start's), which the Advisor publishes in
    Ray's internal KV under the key the builder named (`ModelPolicyInput.measured_key`): each key is
    read at most every `every_s` seconds, on a daemon thread (`in_background`; tests read in the
    tick), until its profile is there. A value that does not parse is logged once and ignored."""

    def __init__(self, store: StateStore, every_s: float = MEASURED_POLL_S, in_background: bool = True):
        self._store, self.every_s, self._in_background = store, every_s, in_background
        self._found: dict[str, Profile] = {}
        self._asked_at: dict[str, float] = {}
        self._reading: dict[str, _Call] = {}
        self._bad: set[str] = set()

    def get(self, key: str, now: float) -> Optional[Profile]:
        if key in self._found:
            return self._found[key]
        call = self._reading.get(key)
        if call is not None and not call.done():
            return None
        self._reading.pop(key, None)
        if now - self._asked_at.get(key, -math.inf) >= self.every_s:
            self._asked_at[key] = now
            if self._in_background:
                self._reading[key] = _Call(self._read, key)
            else:
                self._read(key)
        return self._found.get(key)

    def _read(self, key: str) -> None:
        raw = self._store.get(key)
        if raw is None or key in self._bad:
            return
        try:
            self._found[key] = Profile.model_validate_json(raw)
        except ValueError as exc:
            self._bad.add(key)
            logger.error("plateau policy: the measured profile at %r does not parse (%s); the model keeps its "
                         "predicted plan", key, exc)


class PlateauAutoscaler:
    def __init__(self, evaluate_every_s: float = 1.0, publish_every_s: float = 2.0,
                 store: Optional[StateStore] = None, board=None,
                 ask: Callable[[list[dict[str, float]]], None] = request_resources,
                 read_devices: Callable[[DeviceRead, NodeCache], list[DeviceCapacity]]
                 = read_capacities, watch_in_background: bool = True, ask_in_background: bool = True):
        """`evaluate_every_s` and `publish_every_s` come from config.yaml's policy_kwargs; `store` (the
        policy state's home, default Ray's internal KV), `board` (default: the named status board),
        `ask` (how to ask Ray's autoscaler for devices), `read_devices` (how to read the cluster's
        devices again), `watch_in_background` (False: the tests call the watch's `poll`) and
        `ask_in_background` (False: `ask` runs in the tick) are injected by tests."""
        self.evaluate_every_s = evaluate_every_s
        self.publish_every_s = publish_every_s
        self.state = PolicyState()
        self._store: StateStore = store if store is not None else RayInternalKV()
        self._restored_for: Optional[tuple[str, str]] = None  # (app, deploy id) whose saved state was read back
        self._saved: Optional[PolicyState] = None
        self._board_injected = board is not None
        self._inputs: dict[str, tuple[dict, _VariantInput]] = {}  # deployment -> (its kwargs, parsed)
        self._last_eval = 0.0
        self._last_publish = 0.0
        self._last_routes: Optional[dict[str, list[Route]]] = None
        self._board = board
        self._board_checked = 0.0
        self._errors = 0
        self._ask = ask
        self._requested: Optional[ResourceRequest] = None  # the last request the autoscaler took
        self._ask_failures = 0
        self._ask_in_background = ask_in_background
        self._asking: Optional[tuple[ResourceRequest, _Call]] = None  # the request being sent, and its call
        self._read_devices = read_devices
        self._watch_in_background = watch_in_background
        self._watch: Optional[DeviceWatch] = None
        self._watching: Optional[tuple[DeviceRead, float]] = None  # what the watch reads, and how often
        self._seen_devices: Optional[list[str]] = None  # device names last used, to log a change once
        self._measured = MeasuredProfiles(self._store, in_background=watch_in_background)

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        now = time.time()
        if now - self._last_eval < self.evaluate_every_s:
            return {}, {}
        self._last_eval = now
        try:
            return self._decide(contexts, now), {}
        except Exception as exc:  # keep the last placement; never break the controller loop
            self._errors += 1
            if self._errors <= 5 or self._errors % 100 == 0:
                logger.exception("plateau autoscaling policy failed (%d times); replica targets unchanged", self._errors)
            self._report_error(contexts, f"{type(exc).__name__}: {exc}")
            return {}, {}

    def _decide(self, contexts: dict, now: float) -> dict:
        views: dict[str, dict[int, VariantObservation]] = {}
        inputs: dict[str, ModelPolicyInput] = {}
        ids = {}
        first: Optional[_VariantInput] = None
        app = None
        for dep_id, ctx in contexts.items():
            kwargs = ctx.config.policy.policy_kwargs if ctx.config and ctx.config.policy else {}
            raw = (kwargs or {}).get(POLICY_KWARGS_KEY)
            if raw is None:
                continue  # the ingress
            v = self._input(ctx.deployment_name, raw)
            if first is None:
                first, app = v, ctx.app_name
            inputs[v.model.model] = v.model
            views.setdefault(v.model.model, {})[v.n] = observe(ctx)
            ids[ctx.deployment_name] = dep_id
        if first is None:
            return {}
        cfg = first.policy
        self._restore(app, first.deploy_id)
        pctx = PolicyContext(now=now, devices=self._devices(first), may_add_devices=first.cluster_autoscaling,
                             models=[ModelView(input=inputs[m], variants=views[m], measured=self._measured_for(inputs[m], now))
                                     for m in sorted(inputs)])
        out = decide(pctx, self.state, cfg)
        self.state = out.state
        self._save(app, first.deploy_id)
        asked = out.needed is not None and self._ask_autoscaler(out.needed, now)
        for d in out.new_decisions:
            logger.info("plateau %s %s: N=%d -> N=%d, replicas %d -> %d: %s", d.model, d.action, d.from_n, d.to_n,
                        d.replicas_from, d.replicas_to, d.reason)
        routes = out.routes
        if asked or out.new_decisions or routes != self._last_routes or now - self._last_publish >= self.publish_every_s:
            self._publish(app, out, cfg)
            self._last_routes, self._last_publish = routes, now
        return {ids[dep]: n for dep, n in out.targets.items() if dep in ids}

    def _measured_for(self, inp: ModelPolicyInput, now: float) -> Optional[Profile]:
        """The measured profile of a model that started on a prediction, until the policy took it."""
        refit = self.state.refits.get(inp.model)
        if inp.measured_key is None or (refit is not None and refit.measured_at is not None):
            return None
        return self._measured.get(inp.measured_key, now)

    def _devices(self, v: _VariantInput) -> list[DeviceCapacity]:
        """The devices growth packs onto: the latest reading of the cluster's (on a fixed cluster with
        `device_refresh_s` > 0, once one has landed), else the deploy's."""
        every_s = v.policy.device_refresh_s
        wanted = (v.device_read, every_s) if v.device_read is not None and every_s > 0 else None
        if wanted != self._watching:  # first tick, or a redeploy that changed how the devices are read
            if self._watch is not None:
                self._watch.stop()
            self._watch, self._watching = (self._new_watch(*wanted) if wanted else None), wanted
        devices = self._watch.latest if self._watch is not None and self._watch.latest is not None else v.devices
        names = [d.name for d in devices]
        if self._seen_devices is not None and names != self._seen_devices:
            added, gone = device_changes(self._seen_devices, names)
            logger.info("plateau policy: the cluster's devices changed (%s%s%s); growth packs onto %d devices",
                        f"joined: {', '.join(added)}" if added else "", "; " if added and gone else "",
                        f"left: {', '.join(gone)}" if gone else "", len(names))
        self._seen_devices = names
        return devices

    def _new_watch(self, read: DeviceRead, every_s: float) -> DeviceWatch:
        """A watch that does not hold this policy object (its thread would keep it alive), stopped
        when the object is collected."""
        fn, cache = self._read_devices, NodeCache(read.hosts)  # the builder's names to start from
        watch = DeviceWatch(lambda: fn(read, cache), every_s)
        weakref.finalize(self, watch.stop)
        return watch.start() if self._watch_in_background else watch

    def _ask_autoscaler(self, needed: NeededDevices, now: float) -> bool:
        """Ask for the devices the targets use when they changed; True when Ray's autoscaler took a
        request since the last tick. `request_resources` is a blocking call to the GCS and this runs
        in Serve's controller loop: the call runs on a thread of its own, one at a time (the newest
        request goes next), and a failed one is made again on a later tick."""
        taken = self._finish_ask()
        if self._asking is not None:
            return taken
        request = resource_request(needed, now)
        if self._requested is not None and request.bundles == self._requested.bundles:  # in device-name order
            return taken
        if self._ask_in_background:
            self._asking = (request, _Call(self._ask, request.bundles))
            return taken
        try:
            self._ask(request.bundles)
        except Exception as exc:  # asked again on the next tick
            self._ask_failed(request, exc)
            return taken
        self._ask_taken(request)
        return True

    def _finish_ask(self) -> bool:
        """Collects the background call, once it ended; True when it was taken."""
        if self._asking is None or not self._asking[1].done():
            return False
        (request, call), self._asking = self._asking, None
        if call.error is not None:
            self._ask_failed(request, call.error)
            return False
        self._ask_taken(request)
        return True

    def _ask_failed(self, request: ResourceRequest, exc: BaseException) -> None:
        self._ask_failures += 1
        if self._ask_failures <= 5 or self._ask_failures % 100 == 0:
            logger.error("plateau policy: could not ask Ray's autoscaler for %d devices (%d times): %s: %s",
                         len(request.bundles), self._ask_failures, type(exc).__name__, exc)

    def _ask_taken(self, request: ResourceRequest) -> None:
        self._requested = request
        logger.info("plateau policy: asked Ray's autoscaler for the %d devices the replica targets use%s",
                    len(request.bundles), f" ({describe(request.missing)} beyond the start placement's)"
                    if request.missing else "")

    def _input(self, deployment: str, raw: dict) -> _VariantInput:
        """Parsed once per deployment config (Serve keeps the same kwargs object until a redeploy)."""
        cached = self._inputs.get(deployment)
        if cached is not None and cached[0] is raw:
            return cached[1]
        parsed = _VariantInput.model_validate(raw)
        self._inputs[deployment] = (raw, parsed)
        return parsed

    def _restore(self, app: str, deploy_id: str) -> None:
        """First tick for `app` (after a start or a controller restart): read back the state saved by
        this same build of the app; a new deploy starts fresh. A read that fails raises
        PolicyStateUnreadable (the tick keeps the targets, see `__call__`) and is tried again on
        the next tick."""
        if self._restored_for == (app, deploy_id):
            return
        try:
            raw = self._store.get(policy_key(app))
        except Exception as exc:
            raise PolicyStateUnreadable(
                f"saved state of app {app} could not be read ({type(exc).__name__}: {exc}); replica targets "
                f"are held and nothing is saved until it can be, read again on the next tick") from exc
        self._restored_for = (app, deploy_id)
        state, why = saved_state(raw, deploy_id)
        self.state, self._saved = (state if state is not None else PolicyState()), state
        if state is not None:
            logger.info("plateau policy: state of app %s read back (%s)", app, ", ".join(
                f"{m}: N={s.active_n}{f', re-pack {s.repack.phase}' if s.repack else ''}"
                for m, s in self.state.models.items()) or "no models")
        elif raw:
            logger.warning("plateau policy: saved state of app %s not resumed: %s; starting fresh", app, why)

    def _save(self, app: str, deploy_id: str) -> None:
        if self.state == self._saved:
            return
        try:
            saved = SavedPolicyState(deploy_id=deploy_id, state=self.state)
            self._store.put(policy_key(app), saved.model_dump_json().encode())
            self._saved = self.state
        except Exception:  # retried on the next change
            logger.exception("plateau policy: could not save its state")

    def _get_board(self):
        if self._board is None and not self._board_injected and time.time() - self._board_checked > BOARD_LOOKUP_EVERY_S:
            from cluster.board import find_board

            self._board_checked = time.time()
            self._board = find_board()
        return self._board

    def _publish(self, app: Optional[str], out, cfg: PolicyConfig) -> None:
        board = self._get_board()
        if board is None or app is None:
            return
        try:
            board.publish.remote(app, out.routes, out.live, out.new_decisions, cfg.decisions_kept, self._requested,
                                 self._watch.latest if self._watch is not None else None)
        except Exception:  # board gone: look it up again later
            self._board = None

    def _report_error(self, contexts: dict, message: str) -> None:
        """Errors reach the board even before the first successful publish (`plateau status` shows them)."""
        board = self._get_board()
        app = next((c.app_name for c in contexts.values()), None)
        if board is not None and app is not None:
            try:
                board.policy_error.remote(app, message)
            except Exception:
                self._board = None


def observe(ctx) -> VariantObservation:
    """One variant's observation from its Serve autoscaling context."""
    metrics = ctx.aggregated_metrics or {}

    def per_replica(name: str) -> dict:
        return metrics.get(name) or {}

    done = per_replica("recent_requests")
    total_done = sum(done.values())

    def weighted(name: str) -> float:
        values = per_replica(name)
        if total_done <= 0:
            return 0.0
        return sum(values.get(r, 0.0) * w for r, w in done.items()) / total_done

    kv = per_replica("kv_usage")
    return VariantObservation(
        running=int(ctx.current_num_replicas), target=int(ctx.target_num_replicas),
        # Serve counts only the requests its handles sent (the Python path); those that HAProxy sent
        # to a replica's own server (the direct path) the replicas count themselves
        requests=max(0.0, float(ctx.total_num_requests or 0.0), sum(per_replica("ongoing_requests").values())),
        tokens_per_s=sum(per_replica("tokens_per_s").values()),
        kv_usage=(sum(kv.values()) / len(kv)) if kv else 0.0,
        recent_requests=total_done, recent_prompt_tokens=weighted("recent_prompt_tokens"),
        recent_output_tokens=weighted("recent_output_tokens"),
        recent_output_tokens_sq=weighted("recent_output_tokens_sq"), samples=live_samples(metrics),
    )


def live_samples(metrics: dict) -> list[LiveSample]:
    """Per replica that decoded lately, its decode steps as a live sample for the reality check: the
    mean batch of its decode-only steps and the rate those steps ran at (`replica_stats`)."""
    steps, batch, step_ms = (metrics.get(k) or {} for k in ("decode_steps", "decode_batch", "decode_step_ms"))
    context = metrics.get("mean_context_tokens") or {}
    # Serve keys the metrics by ReplicaID, which has no order: sort by its text for a stable sample order
    return [LiveSample(batch=batch[r], context_tokens=max(0.0, context.get(r, 0.0)),
                       tokens_per_s=1000.0 * batch[r] / step_ms[r])
            for r in sorted(batch, key=str)
            if steps.get(r, 0.0) >= MIN_DECODE_STEPS and batch[r] > 0 and step_ms.get(r, 0.0) > 0]
