"""Application builder for `serve run config.yaml` (import path `deployments.app:build_app`).

It validates the args (`deployments/config.py`), reads the cluster (`deployments/cluster_view.py`),
lays out and packs each model's replicas (`deployments/layout.py`), and binds the Serve graph:
one deployment per packing variant of each model, all behind the OpenAI ingress. It refuses
elastic models when the application's plateau autoscaling policy is missing.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable, Optional

import ray
from ray import serve
from ray.serve import Application

from cluster.autoscaler import NeededDevices, ResourceRequest, describe, resource_request
from cluster.board import AppPlacement
from cluster.inventory import DeviceRead, Inventory
from cluster.policy import Route
from deployments.autoscale import POLICY_FUNCTION, policy_kwargs, request_resources
from deployments.cluster_view import ClusterView, uses_gpus
from deployments.config import AppArgs, AppConfigError, open_access_warning, parse_args
from cluster.routing import ServedModel
from deployments.direct_path import haproxy_enabled, missing_env, replica_env, slow_path_warning
from deployments.engine import actor_options, deployment_options, vllm_version
from deployments.ingress import OpenAIIngress
from deployments.layout import apply_plan, ask_plan, cluster_for, layout_model, place, plan_summary
from deployments.replica import LLMReplica
from deployments.replica_front import FrontSettings
from deployments.router import PlateauRouter
from deployments.vllm_api import openai_schema

logger = logging.getLogger("ray.serve")


def build(args: AppArgs, cluster: ClusterView, inventory: Optional[Inventory] = None) -> Application:
    read = DeviceRead(declared_gpu_memory=int(args.device_memory) if args.device_memory else None,
                      use_gpus=uses_gpus(args.device, cluster))
    inventory = inventory or read.inventory()
    read = read.model_copy(update={"hosts": inventory.hosts()})  # the policy's later reads keep these names
    if not inventory.devices:
        raise AppConfigError("the Ray cluster has no alive nodes to place replicas on")
    # a model served on several device types is laid out once per type, keyed <name>@<type>
    entries = [entry for model in args.models for entry in model.per_device_type()]
    devices = {}
    for key, m in entries:
        try:
            devices[key] = inventory.of_type(m.device_type)
        except ValueError as exc:
            raise AppConfigError(f"model {m.served_name!r}: device type {m.device_type!r}: {exc}; name one of them, "
                                 f"or start nodes of that type") from None
    # every auto model's plan is asked for first: profiles on different device types run at once
    views = {key: cluster_for(m, cluster, devices[key]) for key, m in entries}
    pending = {key: ask_plan(m, views[key], args.device, devices[key], args.profile_store)
               for key, m in entries if m.replicas_per_device == "auto"}
    layouts, plans = [], {}
    for key, m in entries:
        profile, sharing, measured = None, None, None
        if key in pending:
            m, profile, plan = apply_plan(pending[key])
            plans[key], sharing = plan_summary(plan), plan.sharing
            measured = pending[key].request.measured_key if plan.predicted else None
        layouts.append(layout_model(m, views[key], devices[key], args.device, profile, key=key, sharing=sharing,
                                    measured_key=measured))
    needed = place(layouts, inventory, autoscaling=args.cluster_autoscaling)
    # with an autoscaler the request is made on every deploy: it replaces the last one (a target, not a delta)
    requested = ask_autoscaler(needed) if args.cluster_autoscaling else None
    # the policy packs onto the devices there are and those requested from the autoscaler
    capacities = needed.capacities()
    deploy_id = uuid.uuid4().hex  # saved policy state is read back into this build only
    front = FrontSettings(api_key=args.resolved_api_key(), default_model=args.models[0].served_name,
                          limits=args.limits)
    same_loop = replica_env()  # Serve's same-loop settings for the replicas of a Ray without its throughput mode
    handles: dict[str, dict[str, object]] = {}  # served name -> variant deployment -> its bound deployment
    routes = {}  # by the policy's model (the layout key)
    for lay in layouts:
        name, served_name = lay.policy_input.model, lay.config.served_name
        if lay.config.elastic:
            logger.info("model %s: replica counts follow the plateau policy (needs the application's "
                        "autoscaling_policy: deployments.autoscale:PlateauAutoscaler in config.yaml)", name)
        routes[name] = []
        for k, spec in lay.specs.items():
            spec = spec.model_copy(update={"shape_window_s": args.policy.shape_window_s})  # what the policy reads
            count = lay.initial_replicas if k == lay.active_n else 0
            autoscaling = {
                # re-packing scales whole variants to zero, so only a single-variant model keeps its minimum
                "min_replicas": 0 if len(lay.specs) > 1 else lay.policy_input.min_replicas,
                "max_replicas": max(1, lay.policy_input.max_replicas),
                "initial_replicas": count,
                # the plateau policy holds its own hysteresis; Serve's delays would stack on top
                "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                "metrics_interval_s": 1.0, "look_back_period_s": 5.0,
                "target_ongoing_requests": max(1.0, spec.max_num_seqs * args.policy.target_batch_fill),
                "policy": {"policy_kwargs": policy_kwargs(lay.policy_input, k, args.policy, capacities, deploy_id,
                                                                args.cluster_autoscaling, read)},
            }
            opts = deployment_options(spec, count, autoscaling, name=lay.policy_input.variant(k).deployment,
                                      env_vars=same_loop)
            handles.setdefault(served_name, {})[opts["name"]] = serve.deployment(LLMReplica).options(**opts).bind(spec, front)
            routes[name].append(Route(n=k, deployment=opts["name"], accepting=k == lay.active_n, running=count,
                                      max_num_seqs=spec.max_num_seqs))
    served = []  # one per served name, over the layouts of all its device types
    for served_name in handles:
        lays = [lay for lay in layouts if lay.config.served_name == served_name]
        keys = [lay.policy_input.model for lay in lays]
        served.append(ServedModel(name=served_name, max_model_len=lays[0].config.max_model_len,
                                  replicas=sum(lay.initial_replicas for lay in lays),
                                  keys=[] if keys == [served_name] else keys))
    placement = AppPlacement(app="", deploy_id=deploy_id, devices=inventory.devices, packing=needed.packing, routes=routes,
                             requested=requested, plans=plans)
    ingress = serve.deployment(OpenAIIngress).options(
        name="OpenAIIngress", ray_actor_options=actor_options(0, same_loop), max_ongoing_requests=4096,
        # an application-level policy needs every deployment to autoscale; the ingress stays at one
        autoscaling_config={"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1},
    )
    first = layouts[0]
    schema = openai_schema(first.specs[first.active_n])
    app = ingress.bind(handles, served, args.resolved_api_key(), args.retry, placement, schema, vllm_version(),
                       args.limits)
    missing = missing_env(models=len(served))
    if missing:
        logger.warning(slow_path_warning(missing))
    if not haproxy_enabled():
        return app
    # the direct data path: HAProxy asks the router which LLM replica takes each POST and sends it there
    # (Ray runs one router replica per proxy node and refuses an autoscaling_config for it)
    router = serve.deployment(PlateauRouter).options(
        name="PlateauRouter", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    return app._with_ingress_request_router(router.bind(served, routes, args.limits))


def ask_autoscaler(needed: NeededDevices,
                   ask: Callable[[list[dict[str, float]]], None] = request_resources) -> ResourceRequest:
    """Ask Ray's autoscaler for every device the placement uses (`ask`: tests inject it)."""
    request = resource_request(needed, time.time())
    ask(request.bundles)
    if needed.missing:
        logger.warning("the start placement lacks %s: asked Ray's autoscaler for them (request_resources, %d device "
                       "bundles in all); the replicas placed there start when the nodes join",
                       describe(needed.missing), len(request.bundles))
    else:
        logger.info("asked Ray's autoscaler for the %d devices the start placement uses (request_resources; "
                    "replaces any earlier request)", len(request.bundles))
    return request


def build_app(raw_args: Optional[dict] = None) -> Application:
    """Entry point for `serve run`: validate the args, read the cluster, bind the app."""
    from deployments.install_check import check_install

    check_install()  # a broken torchvision says what to run, not "Could not import module 'LlamaConfig'"
    args = parse_args(raw_args)
    # an unset api_key_env fails here, before anything starts; an empty key starts an open server, said aloud
    if (warning := open_access_warning(args)) is not None:
        logger.warning(warning)
    check_policy_configured(args, raw_args, _serve_app_configs())
    return build(args, ClusterView.from_ray())


def check_policy_configured(args: AppArgs, raw_args: Optional[dict], app_configs: list[dict]) -> None:
    """Elastic models (variants, min/max_replicas) need the app-level plateau policy: without it
    Serve's default policy would scale their variant deployments (min_replicas 0, no delays).

    The builder is not told the app's `autoscaling_policy`, but Serve's controller writes the
    config (with it) to its checkpoint before it starts the build task, so the builder reads the
    app configs back and looks for the one built by this builder with these args.
    """
    elastic = [m.served_name for m in args.models if m.elastic]
    if not elastic:
        return
    ours = [c for c in app_configs if str(c.get("import_path", "")).startswith("deployments.app:")
            and (c.get("args") or {}) == (raw_args or {})]
    if any((c.get("autoscaling_policy") or {}).get("policy_function") == POLICY_FUNCTION for c in ours):
        return
    found = "no Serve application config with these args was found" if not ours else \
        f"its autoscaling_policy is {ours[0].get('autoscaling_policy')!r}"
    raise AppConfigError(
        f"models {', '.join(elastic)} set variants or min/max_replicas, which needs the application-level "
        f"policy ({found}); add `autoscaling_policy: {{policy_function: {POLICY_FUNCTION}}}` to the application "
        f"in config.yaml and deploy it with `serve run config.yaml`, or remove variants/min_replicas/max_replicas"
    )


def _serve_app_configs() -> list[dict]:
    """The app configs Serve's controller holds (empty when there is no controller, e.g. a Python deploy)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return []
    configs = ray.get(controller.get_app_configs.remote(), timeout=60)
    return [c.model_dump() for c in configs.values()]
