"""The direct data path: Ray's HAProxy sends each OpenAI request straight to one LLM replica's own
HTTP server, where vLLM's app answers it over the replica's engine, so no other Python process
handles its tokens.

Ray 2.60's HAProxy ingress (`ray/serve/_private/haproxy.py`) forwards an app's requests to the
replicas of its *ingress* deployment only: they are the app's targets in the controller
(`ServeController._get_target_groups_for_app`), and an ingress request router
(`Application._with_ingress_request_router`, HAProxy's `POST /internal/route`) can pin a request
to one of them by its actor name. Ray Serve LLM's direct streaming stops there: one model, whose
LLM deployment is the app's ingress. A plateau app has one deployment per model and packing
variant, so this module adds the running replicas of the app's LLM deployments (`LLM:` names)
to the app's targets. Their HTTP ports come from the controller's own allocator
(`allocate_replica_port`, as Ray's ingress replicas get theirs), so HAProxy's server map, its health
checks and the port bookkeeping stay Ray's. The extension is put into the running controller with
the actor's `__ray_call__` (nothing to set before Ray starts) by the router when it starts, and
again after a controller restart (`ensure_controller_extended`).

What must be set before Ray starts is HAProxy itself (`RAY_SERVE_ENABLE_HA_PROXY=1`) and, for the
router to see each request's `model`, `RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1`
(`DIRECT_PATH_ENV`): `make run` sets both, and `serve run` without them warns once at start.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Mapping, Optional

logger = logging.getLogger("ray.serve")

DATA_DEPLOYMENT_PREFIX = "LLM:"  # deployments.engine.replica_deployment_name
DIRECT_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
}
_EXTENDED = "_plateau_data_apps"  # on the controller: app name -> prefix of its data deployments


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    """A Ray Serve boolean variable as Ray reads it (`constants_utils.get_env_bool`: on only when "1";
    "true" is off to Ray, so it must be off here too)."""
    return env.get(name, "0") == "1"


def haproxy_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Ray's HAProxy ingress is on in the processes that inherit `env`."""
    return _env_flag(env, "RAY_SERVE_ENABLE_HA_PROXY")


def body_forwarded(env: Mapping[str, str] = os.environ) -> bool:
    """HAProxy hands the router each POST's body."""
    return _env_flag(env, "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY")


def missing_env(env: Mapping[str, str] = os.environ, models: int = 1) -> list[str]:
    """The variables of the direct path that `env` lacks; the body is needed only to tell models
    apart (one model: every request goes to it)."""
    missing = [] if haproxy_enabled(env) else ["RAY_SERVE_ENABLE_HA_PROXY=1"]
    if models > 1 and not body_forwarded(env):
        missing.append("RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1")
    return missing


# Serve's throughput mode, per replica process: user code and its handles' router on the replica's
# own event loop (`ray/serve/_private/constants.py`). Read when a replica's process imports Serve,
# so a runtime_env can give them to the replicas of a Ray that was started without the mode.
SAME_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def replica_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables the app's replicas get in their runtime_env: Serve's same-loop settings when
    Ray runs without its throughput mode (which sets them) and the user set none of them. The rest
    of the mode (gRPC between replicas, direct ingress) must be set for the whole cluster."""
    if _env_flag(env, "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        return {}
    return {k: v for k, v in SAME_LOOP_ENV.items() if k not in env}


def slow_path_warning(missing: list[str]) -> str:
    return (
        f"serving without the direct data path: Ray was started without {' '.join(missing)}, so every "
        "streamed token crosses the ingress replica's Python process (on a fast engine about half the "
        "tokens/s of the direct path, bench/path_cost.py). These variables must be set before Ray starts: "
        f"stop it and run `{' '.join(missing)} serve run config.yaml` (what `make run` does)"
    )


# ---- inside the Serve controller (run there through `__ray_call__`) ---------------------------
def add_data_targets(controller, app_name: str, ports: list[tuple[str, str, int]] = (),
                     prefix: str = DATA_DEPLOYMENT_PREFIX, port_book=None) -> str:
    """Make the controller give HAProxy, for `app_name`, the running replicas of its deployments
    named `prefix...` that have an HTTP port, next to the app's ingress replicas. `ports` (node id,
    replica unique id, port) are the LLM replicas' ports as they report them: a restarted controller
    rebuilds its port book from the ingress replicas only, so they are put back (Ray's own recovery
    call, additive). `port_book` is Ray's `NodePortManager` (tests pass a fake). Idempotent; returns
    "added" or "present"."""
    if port_book is None:
        from ray.serve._private.node_port_manager import NodePortManager as port_book
    port_book.update_ports([(node, replica, port, None) for node, replica, port in ports])
    apps = getattr(controller, _EXTENDED, None)
    if apps is None:
        apps = {}
        setattr(controller, _EXTENDED, apps)
        original = controller._get_target_groups_for_app

        def extended(self, app, route_prefix):
            return with_data_targets(self, original(app, route_prefix), app, port_book)

        controller._get_target_groups_for_app = types.MethodType(extended, controller)
    present = apps.get(app_name) == prefix
    apps[app_name] = prefix
    return "present" if present else "added"


def with_data_targets(controller, groups: list, app_name: str, port_book) -> list:
    """`groups` (the app's target groups as Ray made them) with the app's data replicas added to its
    HTTP group. An app without a running ingress replica keeps Ray's answer (its requests then go
    to Serve's fallback proxy), and so does every app if this fails: it runs in the controller's
    loop, where an exception would stop HAProxy's updates for all apps."""
    from ray.serve._private.common import RequestProtocol

    prefix = getattr(controller, _EXTENDED, {}).get(app_name)
    if prefix is None or not groups:
        return groups
    try:
        extra = data_targets(controller.deployment_state_manager.get_running_replica_infos(), app_name, prefix,
                             port_book)
    except Exception:  # keep Ray's targets: the app is still served, the Python way
        logger.exception("could not add the LLM replicas of %s to HAProxy's targets", app_name)
        return groups
    if not extra:
        return groups
    return [g.model_copy(update={"targets": [*g.targets, *extra]}) if g.protocol == RequestProtocol.HTTP else g
            for g in groups]


def data_targets(running: dict, app_name: str, prefix: str, port_book) -> list:
    """HAProxy targets for the running replicas (`running`: DeploymentID -> RunningReplicaInfo list,
    the controller's own view, which a redeploy's build does not empty) of `app_name`'s deployments
    named `prefix...` that have an HTTP port in `port_book`."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve.schema import Target

    targets = []
    for dep_id, infos in sorted(running.items(), key=lambda item: item[0].name):
        if dep_id.app_name != app_name or not dep_id.name.startswith(prefix):
            continue
        for info in infos:
            if info.node_id is None or info.node_ip is None:
                continue
            book = port_book.get_node_manager(info.node_id)
            if book.is_port_allocated(info.replica_id.unique_id, RequestProtocol.HTTP):
                targets.append(Target(ip=info.node_ip, port=book.get_port(info.replica_id.unique_id, RequestProtocol.HTTP),
                                      instance_id="", name=info.actor_name))
    return targets


# ---- callers --------------------------------------------------------------------------------
def serve_controller():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    import ray

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


async def ensure_controller_extended(app_name: str, ports: list[tuple[str, str, int]] = (),
                                     controller: Optional[object] = None) -> str:
    """Put the extension into the running controller (again, after a restart), with the LLM
    replicas' ports. The functions travel by value: the controller may not import this package."""
    import sys

    from ray import cloudpickle

    controller = controller or serve_controller()
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        call = controller.__ray_call__.remote(add_data_targets, app_name, list(ports))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    return await call


class ReplicaPort:
    """An HTTP port for one LLM replica, from the controller's allocator (so HAProxy learns it with
    the replica), released when the replica stops."""

    def __init__(self, replica_unique_id: str, node_id: str, controller: Optional[object] = None):
        self.replica_unique_id, self.node_id = replica_unique_id, node_id
        self._controller = controller
        self.port: Optional[int] = None

    @property
    def controller(self):
        if self._controller is None:
            self._controller = serve_controller()
        return self._controller

    async def allocate(self) -> int:
        from ray.serve._private.common import RequestProtocol

        self.port = await self.controller.allocate_replica_port.remote(
            self.node_id, self.replica_unique_id, RequestProtocol.HTTP)
        return self.port

    async def release(self, in_use_by_another: bool = False) -> None:
        """`in_use_by_another`: the port could not be bound; the allocator skips it from now on. A
        controller that restarted may no longer know the port: nothing to release then."""
        from ray.serve._private.common import RequestProtocol

        if self.port is None:
            return
        port, self.port = self.port, None
        try:
            await self.controller.release_replica_port.remote(
                self.node_id, self.replica_unique_id, port, RequestProtocol.HTTP, block_port=in_use_by_another)
        except Exception as exc:
            logger.warning("could not release HTTP port %d of this replica: %s", port, exc)
