"""The status board: a small named Ray actor holding each app's placement, routes and decisions.

Written by the app builder (startup placement) and by the autoscaling policy in the Serve
controller (routes, live readings, decisions: fire-and-forget calls, so the controller never
waits); read by the ingress (which variant may take requests) and by `plateau status`. It also
exports the per-model Ray metrics (`ray_plateau_model_*`) that the Grafana dashboard shows.
"""

from __future__ import annotations

import time
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from cluster.inventory import Device
from cluster.packing import PackResult
from cluster.policy import Decision, LiveModel, Route

BOARD_NAME = "plateau-status"
BOARD_NAMESPACE = "plateau"


class AppPlacement(BaseModel):
    """What the builder decided at startup."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    app: str
    devices: list[Device]
    packing: PackResult = Field(description="Packer result for the initial replicas (deployment -> device).")
    routes: dict[str, list[Route]] = Field(description="Initial routes per model.")
    plans: dict[str, list[str]] = Field(default_factory=dict, description="Model -> the plan's reasons.")


class AppStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    placement: AppPlacement
    routes: dict[str, list[Route]]
    live: list[LiveModel] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    policy_seen_at: Optional[float] = Field(None, description="Last time the policy published (unix s).")
    policy_errors: int = 0
    last_policy_error: Optional[str] = None


class StatusBoard:
    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        self._apps: dict[str, AppStatus] = {}
        tags = ("app", "model")
        self._g = {
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
        self._variant = Gauge("plateau_variant_replicas", "Target replicas of one packing variant.",
                              ("app", "model", "variant"))
        self._decisions = Counter("plateau_decisions_total", "Autoscaling and re-pack decisions.",
                                  ("app", "model", "action"))

    def set_placement(self, placement: AppPlacement) -> None:
        self._apps[placement.app] = AppStatus(placement=placement, routes=placement.routes)

    def publish(self, app: str, routes: dict[str, list[Route]], live: list[LiveModel],
                new_decisions: list[Decision], kept: int = 50) -> None:
        status = self._apps.get(app)
        if status is None:
            return
        self._apps[app] = status.model_copy(update={
            "routes": routes, "live": live, "decisions": (status.decisions + new_decisions)[-kept:],
            "policy_seen_at": time.time(),
        })
        for m in live:
            tags = {"app": app, "model": m.model}
            self._g["active_n"].set(m.active_n, tags)
            self._g["b_star"].set(m.b_star, tags)
            self._g["measured"].set(m.measured_tokens_per_s, tags)
            self._g["kv"].set(m.kv_usage, tags)
            self._g["repacking"].set(1 if m.repack else 0, tags)
            if m.best_n is not None:
                self._g["best_n"].set(m.best_n, tags)
            if m.planned_tokens_per_s is not None:
                self._g["planned"].set(m.planned_tokens_per_s, tags)
            if m.shape is not None:
                self._g["prompt"].set(m.shape.prompt_tokens, tags)
            if m.fit is not None and m.fit.samples:
                self._g["fit_fraction"].set(m.fit.sustained_fraction, tags)
                self._g["fit_error"].set(m.fit.step_error, tags)
            self._g["refits"].set(m.refits, tags)
            for n, replicas in m.replicas.items():
                self._variant.set(replicas, {**tags, "variant": f"n{n}"})
        for d in new_decisions:
            self._decisions.inc(1, {"app": app, "model": d.model, "action": d.action})

    def policy_error(self, app: str, message: str) -> None:
        status = self._apps.get(app)
        if status is not None:
            self._apps[app] = status.model_copy(update={"policy_errors": status.policy_errors + 1,
                                                        "last_policy_error": message})

    def routes(self, app: str) -> Optional[dict[str, list[Route]]]:
        status = self._apps.get(app)
        return status.routes if status else None

    def status(self, app: Optional[str] = None) -> dict[str, AppStatus]:
        return {k: v for k, v in self._apps.items() if app is None or k == app}


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


def render_status(app: str, status: AppStatus, now: Optional[float] = None) -> str:
    """The text `plateau status` prints: devices, start placement, live variants, last decisions."""
    now = time.time() if now is None else now
    p = status.placement
    lines = [f"application {app}"]
    lines.append("devices:")
    for d in p.devices:
        lines.append(f"  {d.name:<24} {d.model_name:<22} {d.memory_bytes / 2**30:6.1f} GiB ({d.memory_source})")
    lines.append(f"start placement ({p.packing.devices_used} device(s) used, lower bound {p.packing.lower_bound}):")
    for device, items in p.packing.placement.items():
        body = ", ".join(f"{i.model} x{i.replicas} (share {i.share:g}, {i.memory_bytes / 2**30:.2f} GiB)" for i in items)
        lines.append(f"  {device:<24} {body}")
    lines.append("models:")
    live = {m.model: m for m in status.live}
    for model, routes in sorted(status.routes.items()):
        m = live.get(model)
        variants = "  ".join(f"n{r.n}: {r.running} running{'' if r.accepting else ' (not accepting)'}" for r in routes)
        lines.append(f"  {model}: {variants}")
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
