"""The builder's pure half: variants per model, their memory, and the startup placement check."""

import pytest

from cluster.inventory import Device, Inventory
from deployments.cluster_view import ClusterView
from deployments.config import AppConfigError, parse_args
from deployments.layout import layout_model, place
from tests.factories import make_profile

GiB = 1 << 30
CLUSTER = ClusterView(gpus=2, cpus_per_node=4, engine_device="cpu")


def inventory(n=2, memory=4 * GiB):
    return Inventory(devices=[Device(name=f"h/gpu{i}", node_id="h", kind="cuda", model_name="logical GPU",
                                     memory_bytes=memory, memory_source="declared", cores=2) for i in range(n)])


def model(**fields):
    return parse_args({"models": [fields]}).models[0]


PROFILE = make_profile().model_copy(update={"cores": 2})


def test_fixed_model_gets_one_variant_sized_by_its_device_share():
    lay = layout_model(model(replicas_per_device=2, kv_cache_bytes="256MiB"), CLUSTER, inventory(), "auto", None)
    assert list(lay.specs) == [2] and lay.active_n == 2 and lay.initial_replicas == 2
    (v,) = lay.policy_input.variants
    assert v.deployment == "LLM:smollm2-135m@n2" and v.share == 0.5 and v.memory_bytes == int(4 * GiB * 0.9) // 2
    assert lay.specs[2].resources.num_gpus == 0.5 and lay.specs[2].kv_cache_bytes == 256 << 20


def test_profiled_model_gets_a_variant_per_n_with_kv_from_its_share():
    m = model(replicas_per_device=1, variants=[1, 2], min_replicas=1, max_replicas=3)
    lay = layout_model(m, CLUSTER, inventory(), "auto", PROFILE)
    assert sorted(lay.specs) == [1, 2]
    assert (lay.policy_input.min_replicas, lay.policy_input.max_replicas) == (1, 3)
    planned = lay.active_n
    other = 1 if planned == 2 else 2
    fixed = PROFILE.weight_bytes + PROFILE.overhead_bytes
    assert lay.specs[other].kv_cache_bytes <= int(4 * GiB * 0.9) // other - fixed
    assert lay.policy_input.variant(other).memory_bytes == fixed + lay.specs[other].kv_cache_bytes
    assert lay.specs[planned].max_num_seqs == lay.specs[other].max_num_seqs  # B from the plan for both


def test_the_planned_n_batches_past_b_star_and_the_other_variants_keep_b_star():
    from advisor.plateau import PlateauRules, plateau_batches
    from tests.factories import FakeRunner
    flat = make_profile(runner=FakeRunner(a=20, b=4, c=0), rules=PlateauRules(tpot_growth_limit=10))
    flat = flat.model_copy(update={"cores": 2})
    assert plateau_batches(flat.points, flat.rules) == [24, 32]
    lay = layout_model(model(replicas_per_device=1, variants=[1, 2], min_replicas=1, max_replicas=3), CLUSTER,
                       inventory(), "auto", flat)
    planned, other = lay.active_n, 1 if lay.active_n == 2 else 2
    assert lay.specs[planned].max_num_seqs == 32 and lay.policy_input.variant(planned).max_num_seqs == 32
    assert lay.specs[other].max_num_seqs == 24 and lay.policy_input.variant(other).max_num_seqs == 24


def test_variants_without_a_profile_are_refused_with_the_fix():
    with pytest.raises(AppConfigError, match="set replicas_per_device: auto"):
        layout_model(model(replicas_per_device=2, variants=[1]), CLUSTER, inventory(), "auto", None)


def test_a_variant_too_small_for_one_sequence_names_the_shortfall():
    m = model(replicas_per_device=1, variants=[8], max_model_len=4096, prompt_tokens=2000)
    with pytest.raises(AppConfigError, match=r"variant N=8 does not fit.*drop 8 from variants"):
        layout_model(m, CLUSTER, inventory(memory=8 * GiB), "auto", PROFILE)


def test_a_model_that_fits_no_device_fails_with_the_planner_numbers():
    m = model(replicas_per_device=1, prompt_tokens=1500)
    with pytest.raises(AppConfigError, match=r"fits no device.*one replica needs .* GiB"):
        layout_model(m, CLUSTER, inventory(memory=1 * GiB), "auto", PROFILE)


def test_two_models_share_a_device_at_startup():
    a = layout_model(model(replicas_per_device=2, min_replicas=1, max_replicas=1, name="a"), CLUSTER, inventory(),
                     "auto", None)
    b = layout_model(model(replicas_per_device=2, min_replicas=1, max_replicas=1, name="b"), CLUSTER, inventory(),
                     "auto", None)
    result = place([a, b], inventory()).packing
    assert result.devices_used == 1 and not result.unplaced
    assert [p.model for p in result.placement["h/gpu0"]] == ["LLM:a@n2", "LLM:b@n2"]


def test_min_replicas_beyond_capacity_fail_at_startup_saying_by_how_much():
    lay = layout_model(model(replicas_per_device=2, min_replicas=5, max_replicas=6), CLUSTER, inventory(), "auto",
                       None)
    with pytest.raises(AppConfigError) as err:
        place([lay], inventory())
    msg = str(err.value)
    assert "1 of its 5 min_replicas" in msg and "share 0.5" in msg and "devices are full" in msg
    assert "h/gpu0 (logical GPU, 4.0 GiB declared)" in msg and "set cluster_autoscaling: true" in msg


def test_with_cluster_autoscaling_the_missing_devices_are_requested_and_shown_in_the_status():
    from cluster.board import AppPlacement, AppStatus, render_status
    from deployments.app import ask_autoscaler

    lay = layout_model(model(replicas_per_device=2, min_replicas=5, max_replicas=6), CLUSTER, inventory(), "auto",
                       None)
    needed = place([lay], inventory(), autoscaling=True)
    assert needed.packing.unplaced == [] and [(m.count, m.memory_bytes) for m in needed.missing] == [(1, 4 * GiB)]
    asked = []
    request = ask_autoscaler(needed, ask=asked.append)
    assert asked == [[{"GPU": 1.0}] * 3] and request.bundles == asked[0]
    status = AppStatus(placement=AppPlacement(app="p", devices=inventory().devices, packing=needed.packing, routes={},
                                              requested=request))
    text = render_status("p", status)
    assert "for the 3 devices the placement uses: 1 cuda device(s) of 4.0 GiB; the replicas placed there wait" in text
    assert "+cuda-0" in text and "LLM:smollm2-135m@n2 x1" in text
    # the policy grows onto the devices there are and the requested one
    assert [c.name for c in needed.capacities()] == ["h/gpu0", "h/gpu1", "+cuda-0"]


def test_bounds_are_checked_against_each_other():
    with pytest.raises(AppConfigError, match="min_replicas 3 is above max_replicas 2"):
        parse_args({"models": [{"min_replicas": 3, "max_replicas": 2}]})


def test_start_variant_starts_the_model_on_that_n_whatever_the_plan_prefers():
    planned = layout_model(model(replicas_per_device=1, variants=[1, 2], min_replicas=1, max_replicas=1),
                           CLUSTER, inventory(), "auto", PROFILE).active_n
    other = 1 if planned == 2 else 2
    m = model(replicas_per_device=1, variants=[1, 2], start_variant=other, min_replicas=1, max_replicas=1)
    lay = layout_model(m, CLUSTER, inventory(), "auto", PROFILE)
    assert lay.active_n == other and lay.initial_replicas == 1 and sorted(lay.specs) == [1, 2]
    assert lay.active.deployment == f"LLM:smollm2-135m@n{other}"
    packing = place([lay], inventory()).packing
    assert [p.model for ps in packing.placement.values() for p in ps] == [f"LLM:smollm2-135m@n{other}"]


def test_a_start_variant_outside_the_variants_names_the_fix():
    with pytest.raises(AppConfigError, match=r"start_variant 4 is not one of variants \[1, 2\]; add 4 to variants"):
        model(replicas_per_device="auto", variants=[1, 2], start_variant=4)


def typed_inventory():
    def dev(name, node, memory, device_type):
        return Device(name=name, node_id=node, kind="cuda", model_name="logical GPU", memory_bytes=memory,
                      memory_source="node-share", cores=2, device_type=device_type)
    return Inventory(devices=[dev("a/gpu0", "a", 4 * GiB, "small"), dev("b/gpu0", "b", 32 * GiB, "large")])


def test_models_pinned_to_device_types_are_planned_and_placed_on_their_type():
    from deployments.engine import deployment_options

    inv = typed_inventory()
    lays = {t: layout_model(model(replicas_per_device=1, name=f"m-{t}", device_type=t, variants=[1, 2]),
                            CLUSTER, inv.of_type(t), "auto", PROFILE) for t in ("small", "large")}
    small, large = lays["small"], lays["large"]
    # each type's plan is made for its own memory: the small devices hold fewer or smaller replicas
    assert small.policy_input.device.memory_bytes == 4 * GiB and large.policy_input.device.memory_bytes == 32 * GiB
    # on the small type a two-replica variant's KV pool is cut to what half of its memory holds
    assert small.policy_input.variant(2).memory_bytes == int(4 * GiB * 0.9) // 2
    assert large.policy_input.variant(2).memory_bytes > small.policy_input.variant(2).memory_bytes
    assert small.policy_input.device_type == "small"
    spec = small.specs[small.active_n]
    assert spec.resources.accelerator_type == "small"
    assert deployment_options(spec, 1)["ray_actor_options"]["accelerator_type"] == "small"
    assert "accelerator_type" not in deployment_options(layout_model(
        model(replicas_per_device=1), CLUSTER, inv, "auto", None).specs[1], 1)["ray_actor_options"]
    packing = place(list(lays.values()), inv).packing
    assert [p.model for p in packing.placement["a/gpu0"]] == [small.active.deployment]
    assert [p.model for p in packing.placement["b/gpu0"]] == [large.active.deployment]


def test_the_advisor_profiles_a_pinned_model_on_a_whole_device_of_its_type_and_plans_for_its_memory():
    from deployments.layout import advisor_request, device_resources

    inv = typed_inventory()
    m = model(name="m", device_type="small")
    assert device_resources(m, CLUSTER, "auto").task_options() == {"num_gpus": 1.0, "num_cpus": 0.0,
                                                                    "accelerator_type": "small"}
    assert device_resources(model(), CLUSTER, "cpu").task_options() == {"num_gpus": 0.0, "num_cpus": 4}
    assert advisor_request(m, CLUSTER, inv.of_type("small")).device_memory == 4 * GiB
    assert advisor_request(model(), CLUSTER, inv).device_memory is None
    assert advisor_request(m, CLUSTER, inv, store="/shared/profiles").store_dir == "/shared/profiles"


def test_the_profile_store_is_a_path_every_node_mounts_or_an_object_storage_url():
    for good in ("/mnt/shared/profiles", "s3://bucket/profiles", "file:///mnt/profiles"):
        assert parse_args({"profile_store": good}).profile_store == good  # s3fs is needed where it opens, not here
    for bad, why in [("profiles", "must be an absolute folder path that every node mounts"),
                     ("file://profiles", "must be an absolute folder path"),
                     ("abfs://container/profiles", "abfs:// is not supported"),
                     ("gs://bucket/profiles", "gs:// is not supported")]:
        with pytest.raises(AppConfigError, match=f"profile_store = .*{why}"):
            parse_args({"profile_store": bad})


def test_the_builder_reads_the_profile_of_the_device_the_plan_was_made_on(monkeypatch):
    """A model pinned to another type is planned on a node of that type: its profile is keyed by
    that device's name, not by the device of the node that builds the app."""
    from advisor.planner import DeviceSpec, plan_replicas
    from deployments import profiling
    from deployments.layout import PendingPlan, advisor_request, apply_plan

    plan = plan_replicas(PROFILE, DeviceSpec(kind="cuda", name="cuda:NVIDIA L4", memory_bytes=24 * GiB))
    asked = []
    monkeypatch.setattr(profiling, "stored_profile", lambda req, device=None, sharing=None: asked.append(device) or PROFILE)
    m = model(name="m", device_type="L4")
    pending = PendingPlan(model=m, request=advisor_request(m, CLUSTER, typed_inventory().of_type("small")), ref="ref")
    resolved, profile, _ = apply_plan(pending, wait=lambda ref, timeout: plan)
    assert asked == ["cuda:NVIDIA L4"] and profile is PROFILE
    assert (resolved.replicas_per_device, resolved.max_num_seqs) == (plan.replicas_per_device, plan.max_num_seqs)


def test_a_model_pinned_to_a_type_of_smaller_cpu_nodes_asks_for_their_cpus_not_the_largest_nodes():
    from deployments.layout import cluster_for, device_resources

    def node(name, cpus, device_type):
        return Device(name=name, node_id=name, kind="cpu", model_name="CPU node", memory_bytes=64 * GiB,
                      memory_source="node", cores=cpus, device_type=device_type)
    inv = Inventory(devices=[node("big", 32, "x"), node("small", 4, "y")])
    cluster = ClusterView(gpus=0, cpus_per_node=32, engine_device="cpu")
    m = model(name="m", device_type="y", replicas_per_device=2)
    view = cluster_for(m, cluster, inv.of_type("y"))
    assert view.cpus_per_node == 4 and device_resources(m, view, "cpu").num_cpus == 4
    assert layout_model(m, view, inv.of_type("y"), "cpu", None).specs[2].resources.num_cpus == 2
    assert cluster_for(model(), cluster, inv) is cluster


def test_a_model_on_two_device_types_gets_a_layout_per_type_behind_one_served_name():
    from deployments.app import build

    args = parse_args({"models": [{"name": "m", "replicas_per_device": 2, "kv_cache_bytes": "256MiB",
                                   "device_types": ["small", "large"]}]})
    app = build(args, CLUSTER, typed_inventory())
    handles, served, _key, _retry, placement = app._bound_deployment.init_args[:5]
    # one variant deployment per type, each pinned to its type and placed on its type's device
    assert {m: sorted(v) for m, v in handles.items()} == {"m": ["LLM:m_large@n2", "LLM:m_small@n2"]}
    assert [(s.name, s.keys, s.replicas) for s in served] == [("m", ["m@small", "m@large"], 4)]
    assert sorted(placement.routes) == ["m@large", "m@small"]
    assert [p.model for p in placement.packing.placement["a/gpu0"]] == ["LLM:m_small@n2"]
    assert [p.model for p in placement.packing.placement["b/gpu0"]] == ["LLM:m_large@n2"]
    # each type's layout is its own: its replicas share its own device's memory (4 GiB against 32 GiB)
    small, large = (placement.packing.placement[d][0].memory_bytes for d in ("a/gpu0", "b/gpu0"))
    assert large == pytest.approx(8 * small, rel=1e-6)
    # the policy reads the devices again as the builder did (GPUs, no declared memory), keeping its names
    kwargs = handles["m"]["LLM:m_small@n2"]._bound_deployment._deployment_config.autoscaling_config.policy.policy_kwargs
    assert kwargs["plateau"]["device_read"] == {"declared_gpu_memory": None, "use_gpus": True,
                                                "hosts": {"a": "a", "b": "b"}}


def test_each_replica_reports_the_live_shape_over_the_policys_window():
    from deployments.app import build

    args = parse_args({"models": [{"name": "m", "replicas_per_device": 2, "kv_cache_bytes": "256MiB"}],
                       "policy": {"shape_window_s": 20}})
    handles = build(args, CLUSTER, typed_inventory())._bound_deployment.init_args[0]
    spec, front = handles["m"]["LLM:m@n2"]._bound_deployment.init_args
    assert spec.shape_window_s == 20
    assert front.default_model == "m" and front.api_key is None
    default = parse_args({"models": [{"name": "m", "replicas_per_device": 2, "kv_cache_bytes": "256MiB"}]})
    spec, _ = build(default, CLUSTER, typed_inventory())._bound_deployment.init_args[0]["m"]["LLM:m@n2"]._bound_deployment.init_args
    assert spec.shape_window_s == 60

    from deployments.replica import replica_stats  # what the replica reads its live shape with

    stats = replica_stats(spec.model_copy(update={"shape_window_s": 20}))
    stats.on_start("r", prompt_tokens=100)
    stats.on_finish("r", now=0.0, output_tokens=16)
    assert stats.snapshot(19.0).recent_requests == 1
    assert stats.snapshot(21.0).recent_requests == 0  # gone after 20 s, not the default 60


def test_device_types_are_checked():
    with pytest.raises(AppConfigError, match="set device_type .* or device_types .*, not both"):
        model(device_type="a", device_types=["a", "b"])
    with pytest.raises(AppConfigError, match="device_types repeats a"):
        model(device_types=["a", "a"])
    assert [k for k, _ in model(device_types=["a"]).per_device_type()] == ["smollm2-135m"]  # one type: its own name
    # m@small's variants are LLM:m_small@n<N>: a model named m_small would take the same deployments
    with pytest.raises(AppConfigError, match="'m@small' and 'm_small' would name the same variant deployments"):
        parse_args({"models": [{"name": "m", "device_types": ["small", "large"]}, {"name": "m_small"}]})


def test_without_serves_throughput_mode_the_replicas_get_its_same_loop_settings(monkeypatch):
    """A plain `serve run` (Ray started without RAY_SERVE_THROUGHPUT_OPTIMIZED): the ingress and LLM
    replicas still run their code and their handles' router on their own event loop, through their
    runtime_env; with the mode on (make run) the cluster's settings stand and no runtime_env is added."""
    from deployments.app import build
    from deployments.direct_path import SAME_LOOP_ENV

    args = parse_args({"models": [{"name": "m", "replicas_per_device": 2, "kv_cache_bytes": "256MiB"}]})

    def actor_envs() -> list[object]:
        app = build(args, CLUSTER, typed_inventory())
        llm = app._bound_deployment.init_args[0]["m"]["LLM:m@n2"]._bound_deployment
        return [d.ray_actor_options.get("runtime_env") for d in (app._bound_deployment, llm)]

    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    for k in SAME_LOOP_ENV:
        monkeypatch.delenv(k, raising=False)
    assert actor_envs() == [{"env_vars": SAME_LOOP_ENV}] * 2
    monkeypatch.setenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")  # the user's own choice stands
    assert actor_envs() == [{"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}] * 2
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    assert actor_envs() == [None, None]
