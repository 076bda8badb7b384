"""The Serve controller extension that makes HAProxy know the LLM replicas' own servers, on a fake
controller and port book with the methods of Ray 2.60's `ServeController` and `NodePortManager`
that it uses."""

from types import SimpleNamespace

from ray.serve._private.common import DeploymentID, ReplicaID, RequestProtocol
from ray.serve.schema import Target, TargetGroup

from deployments.direct_path import add_data_targets, missing_env, slow_path_warning


class PortBook:
    """NodePortManager's class methods: one book per node, and Ray's recovery call."""

    def __init__(self, ports=None):
        self.ports = dict(ports or {})  # (node, replica unique id) -> port

    def get_node_manager(self, node):
        book = self

        class Node:
            def is_port_allocated(self, replica, protocol):
                return protocol == RequestProtocol.HTTP and (node, replica) in book.ports

            def get_port(self, replica, protocol):
                return book.ports[(node, replica)]

        return Node()

    def update_ports(self, infos):  # additive: a known port is kept
        for node, replica, http_port, _grpc in infos:
            self.ports.setdefault((node, replica), http_port)


def info(app, deployment, unique_id, node="n1"):
    return SimpleNamespace(replica_id=ReplicaID(unique_id, DeploymentID(name=deployment, app_name=app)),
                           node_id=node, node_ip="10.0.0.2", actor_name=f"SERVE_REPLICA::{app}#{deployment}#{unique_id}")


class FakeController:
    """Ray's target groups for an app: its ingress replicas (none: no group, as Ray answers then)."""

    def __init__(self, ingress: dict[str, list[str]], running: list):
        self.ingress = ingress
        self.running = running
        self.deployment_state_manager = SimpleNamespace(get_running_replica_infos=self._running)

    def _running(self):
        by_deployment = {}
        for i in self.running:
            by_deployment.setdefault(i.replica_id.deployment_id, []).append(i)
        return by_deployment

    def _get_target_groups_for_app(self, app, route_prefix):
        targets = [Target(ip="10.0.0.1", port=30000, instance_id="", name=n) for n in self.ingress.get(app, [])]
        if not targets:
            return []
        return [TargetGroup(targets=targets, route_prefix=route_prefix, protocol=RequestProtocol.HTTP, app_name=app),
                TargetGroup(targets=targets, route_prefix=route_prefix, protocol=RequestProtocol.GRPC, app_name=app)]

    def get_target_groups(self, app, route_prefix="/"):  # how Ray's own code calls it
        return self._get_target_groups_for_app(app, route_prefix)


def names(groups, protocol=RequestProtocol.HTTP):
    return [[t.name.rsplit("#", 1)[-1] for t in g.targets] for g in groups if g.protocol == protocol]


def test_haproxy_learns_the_llm_replicas_with_a_port_of_extended_apps_only():
    c = FakeController(ingress={"plateau": ["I"], "other": ["J"]},
                       running=[info("plateau", "LLM:m@n2", "a"), info("plateau", "LLM:m@n2", "b"),
                                info("plateau", "LLM:m@n2", "starting"), info("plateau", "PlateauRouter", "r"),
                                info("other", "LLM:z@n1", "z")])
    book = PortBook({("n1", "a"): 30001, ("n1", "b"): 30002, ("n1", "z"): 30003, ("n1", "r"): 30004})
    assert names(c.get_target_groups("plateau")) == [["I"]]  # Ray alone: the ingress only
    assert add_data_targets(c, "plateau", port_book=book) == "added"
    groups = c.get_target_groups("plateau")
    assert names(groups) == [["I", "a", "b"]]  # no port yet ("starting"), or not an LLM deployment: not a target
    assert [t.port for t in groups[0].targets] == [30000, 30001, 30002]
    assert names(groups, RequestProtocol.GRPC) == [["I"]]
    assert names(c.get_target_groups("other")) == [["J"]]  # an app nobody extended is Ray's
    assert add_data_targets(c, "plateau", port_book=book) == "present"  # the router's periodic check changes nothing
    assert names(c.get_target_groups("plateau")) == [["I", "a", "b"]]


def test_a_restarted_controller_gets_the_llm_replicas_ports_back_from_their_reports():
    """A restarted controller rebuilds its port book from ingress replicas only; the router passes
    the ports the LLM replicas report, and known ports are never overwritten."""
    c = FakeController(ingress={"plateau": ["I"]}, running=[info("plateau", "LLM:m@n2", "a")])
    book = PortBook({("n1", "x"): 30009})
    add_data_targets(c, "plateau", ports=[], port_book=book)
    assert names(c.get_target_groups("plateau")) == [["I"]]  # the book lost a's port
    add_data_targets(c, "plateau", ports=[("n1", "a", 30001), ("n1", "x", 31111)], port_book=book)
    assert names(c.get_target_groups("plateau")) == [["I", "a"]]
    assert book.ports[("n1", "x")] == 30009


def test_an_app_without_a_running_ingress_keeps_rays_answer():
    """Ray then points the app at Serve's fallback proxies; LLM replicas alone make no target group."""
    c = FakeController(ingress={}, running=[info("plateau", "LLM:m@n2", "a")])
    add_data_targets(c, "plateau", port_book=PortBook({("n1", "a"): 30001}))
    assert c.get_target_groups("plateau") == []


def test_a_failing_extension_leaves_rays_targets_for_haproxy():
    """It runs in the controller's loop: raising there would stop HAProxy's updates for every app."""
    c = FakeController(ingress={"plateau": ["I"]}, running=[])

    def broken():
        raise RuntimeError("the controller changed")

    add_data_targets(c, "plateau", port_book=PortBook())
    c.deployment_state_manager = SimpleNamespace(get_running_replica_infos=broken)
    assert names(c.get_target_groups("plateau")) == [["I"]]


def test_serve_run_without_the_variables_is_told_which_to_set():
    assert missing_env({}) == ["RAY_SERVE_ENABLE_HA_PROXY=1"]
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1"}) == []  # one model: no body needed
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, models=2) == ["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1"]
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"},
                       models=2) == []
    # Ray reads its booleans as "1" only: "true" leaves the body unforwarded, so it is still missing
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "true"},
                       models=2) == ["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1"]
    assert missing_env({"RAY_SERVE_ENABLE_HA_PROXY": "true"}) == ["RAY_SERVE_ENABLE_HA_PROXY=1"]
    text = slow_path_warning(["RAY_SERVE_ENABLE_HA_PROXY=1"])
    assert "RAY_SERVE_ENABLE_HA_PROXY=1 serve run config.yaml" in text and "make run" in text
