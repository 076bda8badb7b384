"""The Serve controller extension that makes HAProxy know the LLM replicas' own servers, on a fake
controller with the methods of Ray 2.60's `ServeController` that it uses."""

from types import SimpleNamespace

from ray.serve._private.common import RequestProtocol
from ray.serve.schema import Target, TargetGroup

from deployments.direct_path import add_data_targets, missing_env, slow_path_warning


class FakeController:
    """Ray's target groups for each app: its ingress replicas; `replicas` by (app, deployment)."""

    def __init__(self, deployments: dict[str, list[str]], replicas: dict[tuple[str, str], list[str]], ports=None):
        self.deployments, self.replicas = deployments, replicas
        self.ports = ports if ports is not None else {}
        self.application_state_manager = SimpleNamespace(get_deployments=lambda app: self.deployments[app])

    def _get_target_groups_for_app(self, app, route_prefix):
        ingress = [Target(ip="10.0.0.1", port=30000, instance_id="", name=n) for n in self.replicas.get((app, "ingress"), [])]
        if not ingress:
            return []
        return [TargetGroup(targets=ingress, route_prefix=route_prefix, protocol=RequestProtocol.HTTP, app_name=app),
                TargetGroup(targets=ingress, route_prefix=route_prefix, protocol=RequestProtocol.GRPC, app_name=app)]

    def _get_running_replica_details_for_deployment(self, app, name):
        return [SimpleNamespace(actor_name=n) for n in self.replicas.get((app, name), [])]

    def _get_targets_for_protocol(self, details, protocol):  # only replicas with an allocated port
        return [Target(ip="10.0.0.2", port=self.ports[d.actor_name], instance_id="", name=d.actor_name)
                for d in details if d.actor_name in self.ports]

    def get_target_groups(self, app, route_prefix="/"):  # how Ray's own code calls it
        return self._get_target_groups_for_app(app, route_prefix)


def names(groups, protocol=RequestProtocol.HTTP):
    return [[t.name for t in g.targets] for g in groups if g.protocol == protocol]


def test_haproxy_learns_the_llm_replicas_with_a_port_of_extended_apps_only():
    c = FakeController(
        deployments={"plateau": ["OpenAIIngress", "PlateauRouter", "LLM:m@n1", "LLM:m@n2"], "other": ["LLM:z"]},
        replicas={("plateau", "ingress"): ["I"], ("plateau", "LLM:m@n2"): ["A", "B", "starting"],
                  ("plateau", "PlateauRouter"): ["R"], ("other", "ingress"): ["J"], ("other", "LLM:z"): ["Z"]},
        ports={"A": 30001, "B": 30002, "Z": 30003})
    assert names(c.get_target_groups("plateau")) == [["I"]]  # Ray alone: the ingress only
    assert add_data_targets(c, "plateau") == "added"
    assert names(c.get_target_groups("plateau")) == [["I", "A", "B"]]  # no port yet: not a target
    assert names(c.get_target_groups("plateau"), RequestProtocol.GRPC) == [["I"]]
    assert names(c.get_target_groups("other")) == [["J"]]  # an app nobody extended is Ray's
    assert add_data_targets(c, "plateau") == "present"  # the router's periodic check changes nothing
    assert names(c.get_target_groups("plateau")) == [["I", "A", "B"]]


def test_an_app_without_a_running_ingress_keeps_rays_answer():
    """Ray then points the app at Serve's fallback proxies; LLM replicas alone make no target group."""
    c = FakeController(deployments={"plateau": ["LLM:m@n2"]}, replicas={("plateau", "LLM:m@n2"): ["A"]},
                       ports={"A": 30001})
    add_data_targets(c, "plateau")
    assert c.get_target_groups("plateau") == []


def test_serve_run_without_the_variables_is_told_which_to_set():
    assert missing_env({}) == ["RAY_SERVE_ENABLE_HA_PROXY=1"]
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1"}) == []  # one model: no body needed
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, models=2) == ["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1"]
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "true"},
                       models=2) == []
    text = slow_path_warning(["RAY_SERVE_ENABLE_HA_PROXY=1"])
    assert "RAY_SERVE_ENABLE_HA_PROXY=1 serve run config.yaml" in text and "make run" in text
