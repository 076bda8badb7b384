"""The status board: a small named Ray actor holding each app's placement, routes and decisions.

Written by the app builder (startup placement) and by the autoscaling policy in the Serve
controller (routes, live readings, decisions: fire-and-forget calls, so the controller never
waits); read by the ingress (which variant may take requests) and by `plateau status`. It also
exports the per-model Ray metrics (`ray_plateau_model_*`) that the Grafana dashboard shows.

Each app's status is written to Ray's internal KV store when its placement or routes change and
read back when the board restarts, so a restarted board still knows the placement and the
routes, and keeps taking the policy's publishes. API for the ingress: `routes(app)` (None only
when the board never heard of the app: then send `set_placement` again, see
`ensure_routes`), `set_placement(placement)` (idempotent: it keeps live routes and decisions).
"""

from __future__ import annotations

import time
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from advisor.niceness import undo_worker_niceness
from cluster.autoscaler import ADDED_PREFIX, ResourceRequest, describe
from cluster.inventory import Device, device_changes
from cluster.packing import DeviceCapacity, PackResult
from cluster.policy import Decision, LiveModel, Route
from cluster.routing import REPORT_STALE_S, ReplicaReport
from cluster.state_store import RayInternalKV, StateStore, board_key

BOARD_NAME = "plateau-status"
BOARD_NAMESPACE = "plateau"


class AppPlacement(BaseModel):
    """What the builder decided at startup."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    app: str
    deploy_id: str = Field("", description="One build of the app (`serve run`, a config change): routes the board "
                                           "keeps for it are never handed to another build")
    devices: list[Device]
    packing: PackResult = Field(description="Packer result for the initial replicas (deployment -> device).")
    requested: Optional[ResourceRequest] = Field(None, description="What was asked of Ray's autoscaler, if anything.")
    routes: dict[str, list[Route]] = Field(description="Initial routes per model.")
    plans: dict[str, list[str]] = Field(default_factory=dict, description="Model -> its Advisor plan in short (N, "
                                        "batch, GPU sharing) and the plan's warnings; models with a fixed N: none.")


class AppStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    placement: Optional[AppPlacement] = Field(
        None, description="None until the ingress sends it (the policy may publish, or fail, first).")
    routes: dict[str, list[Route]] = Field(default_factory=dict)
    live: list[LiveModel] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    policy_seen_at: Optional[float] = Field(None, description="Last time the policy published (unix s).")
    policy_errors: int = 0
    last_policy_error: Optional[str] = None
    requested: Optional[ResourceRequest] = Field(
        None, description="The policy's last request to Ray's autoscaler (cluster_autoscaling: the devices its "
                          "targets use, added ones included).")
    devices: Optional[list[DeviceCapacity]] = Field(
        None, description="The devices the policy grows onto, as it last read them (a fixed cluster: nodes that "
                          "joined or left since the deploy); None: the start placement's.")


class DataPlane(BaseModel):
    """What a router needs to pin a request: the variants that take requests, and the replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    routes: dict[str, list[Route]] = Field(description="The policy's routes per model (empty: none published).")
    replicas: list[ReplicaReport] = Field(description="Each replica's latest report, the stale ones left out; "
                                                      "`at` is when the board got it, on the board's clock.")
    now: float = Field(description="The board's clock when it answered (reports' ages are `now - at`).")


class BoardMetrics:
    """The Ray metrics the board exports (`ray_plateau_model_*`, `ray_plateau_decisions_total`)."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        tags = ("app", "model")
        self.gauges = {
            "active_n": Gauge("plateau_model_replicas_per_device", "N of the active packing variant.", tags),
            "best_n": Gauge("plateau_model_best_replicas_per_device", "N predicted best for the live shape.", tags),
            "b_star": Gauge("plateau_model_b_star", "Plateau batch B* for the live shape.", tags),
            "planned": Gauge("plateau_model_planned_tokens_per_s", "Tokens/s the plan predicts for running replicas.",
                             tags),
            "measured": Gauge("plateau_model_measured_tokens_per_s", "Tokens/s the replicas measured.", tags),
            "kv": Gauge("plateau_model_kv_usage", "Highest KV pool usage among the model's replicas (0..1).", tags),
            "prompt": Gauge("plateau_model_live_prompt_tokens", "Mean prompt tokens of recent requests.", tags),
            "repacking": Gauge("plateau_model_repacking", "1 while a re-pack is under way.", tags),
            "fit_fraction": Gauge("plateau_model_live_fraction_of_plan",
                                  "Median live / predicted tokens/s per replica (refit below 0.75).", tags),
            "fit_error": Gauge("plateau_model_step_fit_error", "Step-time fit error on live samples (0..1).", tags),
            "refits": Gauge("plateau_model_refits", "Times the profile was refitted from live samples.", tags),
        }
        self.variant = Gauge("plateau_variant_replicas", "Target replicas of one packing variant.",
                             ("app", "model", "variant"))
        self.decisions = Counter("plateau_decisions_total", "Autoscaling and re-pack decisions.",
                                 ("app", "model", "action"))

    def record(self, app: str, live: list[LiveModel], new_decisions: list[Decision]) -> None:
        for m in live:
            tags = {"app": app, "model": m.model}
            self.gauges["active_n"].set(m.active_n, tags)
            self.gauges["b_star"].set(m.b_star, tags)
            self.gauges["measured"].set(m.measured_tokens_per_s, tags)
            self.gauges["kv"].set(m.kv_usage, tags)
            self.gauges["repacking"].set(1 if m.repack else 0, tags)
            if m.best_n is not None:
                self.gauges["best_n"].set(m.best_n, tags)
            if m.planned_tokens_per_s is not None:
                self.gauges["planned"].set(m.planned_tokens_per_s, tags)
            if m.shape is not None:
                self.gauges["prompt"].set(m.shape.prompt_tokens, tags)
            if m.fit is not None and m.fit.samples:
                self.gauges["fit_fraction"].set(m.fit.sustained_fraction, tags)
                self.gauges["fit_error"].set(m.fit.step_error, tags)
            self.gauges["refits"].set(m.refits, tags)
            for n, replicas in m.replicas.items():
                self.variant.set(replicas, {**tags, "variant": f"n{n}"})
        for d in new_decisions:
            self.decisions.inc(1, {"app": app, "model": d.model, "action": d.action})


class StatusBoard:
    def __init__(self, store: Optional[StateStore] = None, metrics: Optional[BoardMetrics] = None,
                 apps: tuple[str, ...] = ()):
        """Reads back the saved status of every app it knew (`apps` limits that, for tests); `store`
        and `metrics` default to Ray's internal KV and the Ray metrics, tests inject fakes."""
        undo_worker_niceness()  # the routers read it under load: not below the engines (Ray starts it at nice 15)
        self._store: StateStore = store if store is not None else RayInternalKV()
        self._metrics = metrics if metrics is not None else BoardMetrics()
        self._apps: dict[str, AppStatus] = {}
        # replica reports live in memory only: every replica reports again within a second or two
        self._replicas: dict[str, dict[str, ReplicaReport]] = {}
        for app in apps or self._known_apps():
            saved = self._load(app)
            if saved is not None:
                self._apps[app] = saved

    # ---- persistence ------------------------------------------------------------------------
    def _known_apps(self) -> list[str]:
        raw = self._store.get(board_key(""))
        return [a for a in (raw or b"").decode().split("\n") if a]

    def _load(self, app: str) -> Optional[AppStatus]:
        raw = self._store.get(board_key(app))
        if not raw:
            return None
        try:
            return AppStatus.model_validate_json(raw)
        except ValueError:  # an older layout: the ingress sends the placement again
            return None

    def _save(self, app: str) -> None:
        try:
            self._store.put(board_key(app), self._apps[app].model_dump_json().encode())
            known = self._known_apps()
            if app not in known:
                self._store.put(board_key(""), "\n".join(known + [app]).encode())
        except Exception:  # the GCS is unreachable: the in-memory status still serves
            pass

    def _status(self, app: str) -> AppStatus:
        return self._apps.get(app) or AppStatus()

    # ---- writers ------------------------------------------------------------------------------
    def set_placement(self, placement: AppPlacement) -> None:
        """The ingress's start placement. Live routes of the same build are kept (an ingress restart
        must not reopen a draining variant); a new build starts from its own routes, even where its
        variants have the names of the last build's."""
        status = self._apps.get(placement.app)
        same = (status is not None and status.placement is not None
                and status.placement.deploy_id == placement.deploy_id
                and _variants(status.routes) == _variants(placement.routes))
        routes = status.routes if same else placement.routes
        self._apps[placement.app] = self._status(placement.app).model_copy(
            update={"placement": placement, "routes": routes})
        self._save(placement.app)

    def publish(self, app: str, routes: dict[str, list[Route]], live: list[LiveModel],
                new_decisions: list[Decision], kept: int = 50, requested: Optional[ResourceRequest] = None,
                devices: Optional[list[DeviceCapacity]] = None) -> None:
        """The policy's routes, readings, decisions, its last autoscaler request (None: it asked
        nothing, e.g. without cluster_autoscaling) and the devices it last read (None: it does not
        read them); taken even before (or without) a placement."""
        status = self._status(app)
        changed = (routes != status.routes or bool(new_decisions) or requested != status.requested
                   or devices != status.devices)
        self._apps[app] = status.model_copy(update={
            "routes": routes, "live": live, "decisions": (status.decisions + new_decisions)[-kept:],
            "policy_seen_at": time.time(), "requested": requested, "devices": devices,
        })
        if changed:
            self._save(app)
        self._metrics.record(app, live, new_decisions)

    def policy_error(self, app: str, message: str) -> None:
        """Counted even before the placement or the first successful publish arrives."""
        status = self._status(app)
        self._apps[app] = status.model_copy(update={"policy_errors": status.policy_errors + 1,
                                                    "last_policy_error": message})

    def report_replica(self, app: str, report: ReplicaReport, now: Optional[float] = None) -> None:
        """A replica's latest reading of itself (fire-and-forget from the replicas), stamped with the
        board's clock (the replicas' clocks may be another node's)."""
        at = time.time() if now is None else now
        self._replicas.setdefault(app, {})[report.replica_id] = report.model_copy(update={"at": at})

    def forget_replica(self, app: str, replica_id: str) -> None:
        self._replicas.get(app, {}).pop(replica_id, None)

    # ---- readers ------------------------------------------------------------------------------
    def data_plane(self, app: str, now: Optional[float] = None) -> DataPlane:
        """The app's routes and its replicas' latest reports (reports older than `REPORT_STALE_S`
        are dropped: their replica is gone)."""
        now = time.time() if now is None else now
        reports = self._replicas.get(app, {})
        for replica_id in [k for k, r in reports.items() if now - r.at > REPORT_STALE_S]:
            del reports[replica_id]
        status = self._apps.get(app)
        return DataPlane(routes=status.routes if status is not None else {}, replicas=list(reports.values()), now=now)

    def routes(self, app: str) -> Optional[dict[str, list[Route]]]:
        """The app's routes (after a board restart: the saved ones); None if the board never heard of it."""
        status = self._apps.get(app)
        return status.routes if status is not None and status.routes else None

    def status(self, app: Optional[str] = None) -> dict[str, AppStatus]:
        return {k: v for k, v in self._apps.items() if app is None or k == app}


def _variants(routes: dict[str, list[Route]]) -> set[tuple[str, str]]:
    return {(model, r.deployment) for model, rs in routes.items() for r in rs}


async def ensure_routes(board, placement: AppPlacement) -> dict[str, list[Route]]:
    """For the ingress's refresh loop: the board's routes for `placement.app`; when the board has
    none (it restarted and could not read its saved state back), send the placement again and use
    its routes until the policy publishes."""
    routes = await board.routes.remote(placement.app)
    if routes:
        return routes
    await board.set_placement.remote(placement)
    return placement.routes


def get_or_create_board():
    import ray

    return ray.remote(StatusBoard).options(
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0,
    ).remote()


def find_board():
    """The board if it exists, else None (never creates one, never starts Ray)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    except ValueError:
        return None


def _devices_by_node(p: AppPlacement) -> list[str]:
    """Each node (its device type) with its devices and the start replicas on each."""
    lines = []
    nodes: dict[str, list[Device]] = {}
    for d in p.devices:
        nodes.setdefault(d.node_id, []).append(d)
    for node_id, devices in nodes.items():
        types = sorted({d.device_type or "no accelerator type" for d in devices})
        address = devices[0].node_address or "(address not recorded)"
        lines.append(f"  node {address} ({node_id[:8]}), device type {', '.join(types)}:")
        for d in devices:
            items = p.packing.placement.get(d.name, [])
            body = ", ".join(f"{i.model} x{i.replicas} (share {i.share:g}, {i.memory_bytes / 2**30:.2f} GiB)"
                             for i in items) or "(empty)"
            lines.append(f"    {d.name:<24} {d.model_name:<22} {d.memory_bytes / 2**30:6.1f} GiB ({d.memory_source}): "
                         f"{body}")
    return lines


def render_status(app: str, status: AppStatus, now: Optional[float] = None) -> str:
    """The text `plateau status` prints: devices, start placement, live variants, last decisions."""
    now = time.time() if now is None else now
    p = status.placement
    lines = [f"application {app}"]
    if p is None:
        lines.append("devices and start placement: not known yet (the ingress has not started)")
    else:
        lines.append(f"devices and start placement by node ({p.packing.devices_used} device(s) used, "
                     f"lower bound {p.packing.lower_bound}):")
        lines += _devices_by_node(p)
        if p.requested is not None:
            added = {name: items for name, items in p.packing.placement.items() if name.startswith(ADDED_PREFIX)}
            at = time.strftime('%H:%M:%S', time.localtime(p.requested.at))
            what = (f"{describe(p.requested.missing)}; the replicas placed there wait for the nodes:"
                    if p.requested.missing else "nothing missing")
            lines.append(f"  asked Ray's autoscaler at {at} for the {len(p.requested.bundles)} devices the placement "
                         f"uses: {what}")
            for name, items in added.items():
                lines.append(f"    {name:<24} " + ", ".join(f"{i.model} x{i.replicas}" for i in items))
    if status.requested is not None:
        r = status.requested
        lines.append(f"the policy last asked Ray's autoscaler at {time.strftime('%H:%M:%S', time.localtime(r.at))} "
                     f"for the {len(r.bundles)} devices its replica targets use: "
                     + (f"{describe(r.missing)} beyond the start placement's devices" if r.missing
                        else "none beyond the start placement's devices"))
    if status.devices is not None and p is not None:
        names = [d.name for d in status.devices]
        joined, left = device_changes([d.name for d in p.devices], names)
        if joined or left:
            lines.append(f"the policy grows onto the {len(names)} devices the cluster has now: "
                         + "; ".join(part for part in (f"joined since the deploy: {', '.join(joined)}" if joined else "",
                                                       f"left: {', '.join(left)}" if left else "") if part))
    lines.append("models:")
    live = {m.model: m for m in status.live}
    for model, routes in sorted(status.routes.items()):
        m = live.get(model)
        variants = "  ".join(f"n{r.n}: {r.running} running{'' if r.accepting else ' (not accepting)'}" for r in routes)
        lines.append(f"  {model}: {variants}")
        for line in (p.plans.get(model, []) if p is not None else []):
            lines.append(f"    plan: {line}")
        if m is not None:
            shape = f"prompt {m.shape.prompt_tokens} / output {m.shape.output_tokens}" if m.shape else "not enough traffic"
            planned = f"{m.planned_tokens_per_s:.0f}" if m.planned_tokens_per_s is not None else "-"
            lines.append(f"    active N={m.active_n}, best N={m.best_n if m.best_n is not None else '-'}, B*={m.b_star}, "
                         f"live shape: {shape}; tokens/s at B* (planned) {planned}, measured {m.measured_tokens_per_s:.0f}; "
                         f"KV {m.kv_usage:.0%}")
            if m.fit is not None:
                lines.append(f"    live vs plan ({m.refits} refit(s)): {m.fit.verdict}: {m.fit.reason}")
            if m.repack is not None:
                lines.append(f"    re-packing N={m.repack.from_n} -> N={m.repack.to_n} ({m.repack.phase}, "
                             f"{now - m.repack.started_at:.0f} s): {m.repack.reason}")
    seen = f"{now - status.policy_seen_at:.0f} s ago" if status.policy_seen_at else "never (is autoscaling_policy set?)"
    lines.append(f"policy last ran: {seen}; errors: {status.policy_errors}"
                 + (f" (last: {status.last_policy_error})" if status.last_policy_error else ""))
    lines.append("last decisions:")
    for d in status.decisions[-10:] or []:
        gain = f", predicted gain {d.predicted_gain:+.0%}" if d.predicted_gain is not None else ""
        took = f", took {d.seconds:.0f} s" if d.seconds is not None else ""
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(d.at))} {d.model} {d.action} N={d.from_n}->N={d.to_n} "
                     f"replicas {d.replicas_from}->{d.replicas_to}{gain}{took}: {d.reason}")
    if not status.decisions:
        lines.append("  (none)")
    return "\n".join(lines)
