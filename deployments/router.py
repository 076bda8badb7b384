"""The ingress request router of the direct data path: Ray's HAProxy asks it, for every POST, which
replica answers (`POST /internal/route`, with the request body), then forwards the request there
itself (`deployments/direct_path.py`).

It pins the request to the LLM replica of the body's model with the most free room in a variant
that takes requests (`cluster.routing.choose_replica`): from the routes and the replicas' reports
on the status board, refreshed every `REFRESH_S` while requests come (`IDLE_REFRESH_S` after a quiet
spell), and the pins it made since (`Assignments`). What
it cannot pin goes to the ingress replica, the Python path, which answers, waits or retries as it
always did: a model the app does not serve (its 404), no replica of the model running and taking
requests yet, a body HAProxy did not forward or forwarded cut while several models are served (a
body without a `model`, or not JSON, goes to the default model's replica, where vLLM answers it), and
a body over `RequestLimits` (too large, or nested too deep to parse safely), which the ingress
refuses in vLLM's error format. It also keeps the Serve controller extended, so HAProxy knows the
LLM replicas' servers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from advisor.niceness import undo_worker_niceness
from cluster.board import get_or_create_board
from cluster.policy import Route
from cluster.routing import (Assignments, ReplicaReport, RequestLimits, ServedModel, body_refusal, choose_replica,
                             merge_routes, model_of)
from deployments.direct_path import ensure_controller_extended

logger = logging.getLogger("ray.serve")

REFRESH_S = 0.25  # how often the routes and the replicas' reports are read from the board while requests come
IDLE_REFRESH_S = 2.0  # and how often once none came for IDLE_AFTER_S (a 2-core node feels every wakeup)
IDLE_AFTER_S = 5.0
EXTEND_CHECK_S = 5.0  # how often the controller extension is checked (a restarted controller lost it)
# Not a replica HAProxy knows: its Lua then sends the request to Serve's fallback proxy, which hands
# it to the ingress (the Python path). Used only until the ingress has reported where it is.
PYTHON_PATH = "plateau:python-path"

router_app = FastAPI(title="plateau-serve router", docs_url=None, redoc_url=None, openapi_url=None)


def pick(body: bytes, truncated: bool, models: dict[str, ServedModel], default_model: str,
         routes: dict[str, list[Route]], reports: list[ReplicaReport], assignments: Assignments,
         now: float, limits: RequestLimits = RequestLimits()) -> Optional[ReplicaReport]:
    """The LLM replica for a request body (None: the Python path). A body without a `model` goes to
    the default model, as the ingress sends it (vLLM answers what is wrong with it); a body HAProxy
    did not forward (not told to) or forwarded cut routes only where the app serves one model (its
    replica reads the whole body and hands over another model's request). A body over `limits` goes
    to the ingress, which answers the refusal: the router never parses it (a cut one is judged by its
    size only, its nesting by the replica's front, which reads it whole)."""
    if body and body_refusal(body, limits, parsed=not truncated) is not None:
        return None
    if truncated or not body:
        if len(models) != 1:
            return None
        model = default_model
    else:
        model = model_of(body) or default_model
    if model not in models:
        return None
    candidates = [r for r in reports if r.model == model]
    pending = {r.replica_id: assignments.pending(r.replica_id, now) for r in candidates}
    return choose_replica(model, routes.get(model, []), candidates, pending, now)


@serve.ingress(router_app)
class PlateauRouter:
    async def __init__(self, models: list[ServedModel], routes: dict[str, list[Route]],
                       limits: RequestLimits = RequestLimits()):
        """`models` (the first is the default), `routes` (the build's, by the policy's models) and the
        app's request `limits`."""
        self.limits = limits
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.start_routes = merge_routes(routes, models)  # by served name, until the board has the policy's
        self.routes = self.start_routes
        self.reports: list[ReplicaReport] = []
        self.ingress_id: Optional[str] = None
        self.assignments = Assignments()
        self.app_name = serve.get_replica_context().app_name
        self.pinned = 0  # requests pinned to an LLM replica
        self.python_path = 0  # requests sent to the ingress
        self._warned_no_body = False
        self._last_request = time.monotonic()
        self._idle = asyncio.Event()  # set while the router reads the board at the idle pace
        self._wake = asyncio.Event()
        # HAProxy waits on this process for every POST (5 s, then a 503): at Ray's worker niceness it
        # would wait behind the engines under load
        if (warning := undo_worker_niceness()) is not None:
            logger.warning(warning)
        self._board = get_or_create_board()
        try:
            logger.info("Serve controller extension for app %r: %s", self.app_name,
                        await ensure_controller_extended(self.app_name))
        except Exception:  # without it HAProxy knows no LLM replica: every pin misses and goes the Python way
            logger.exception("could not extend the Serve controller: requests take the Python path")
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_forever())
        self._extender = loop.create_task(self._keep_controller_extended())

    @router_app.post("/internal/route")
    async def route(self, request: Request) -> JSONResponse:
        body = await request.body()
        truncated = "x-body-truncated" in request.headers
        chosen = pick(body, truncated, self.models, self.default_model, self.routes, self.reports, self.assignments,
                      time.time(), self.limits)
        if chosen is None:
            self.python_path += 1
            if not body and len(self.models) > 1 and not self._warned_no_body:
                self._warned_no_body = True
                logger.warning("HAProxy forwards no request body to the router, so requests cannot be told apart by "
                               "model and all take the Python path: start Ray with "
                               "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1")
            return JSONResponse({"replica_id": self.ingress_id or PYTHON_PATH})
        self.assignments.sent(chosen.replica_id, time.time())
        self.pinned += 1
        self._last_request = time.monotonic()
        if self._idle.is_set():  # the first request after a quiet spell: read the board now
            self._idle.clear()
            self._wake.set()
        return JSONResponse({"replica_id": chosen.replica_id})

    def counts(self) -> dict[str, int]:
        """Requests pinned to LLM replicas and sent the Python way since start."""
        return {"pinned": self.pinned, "python_path": self.python_path}

    async def _refresh_forever(self) -> None:
        while True:
            try:
                view = await self._board.data_plane.remote(self.app_name)
                if view.routes:
                    self.routes = merge_routes(view.routes, list(self.models.values()))
                for report in view.replicas:
                    self.assignments.observe(report)
                self.assignments.forget_except({r.replica_id for r in view.replicas})
                # ages on this clock: the board stamps reports with its own, maybe another node's
                local = time.time()
                self.reports = [r.model_copy(update={"at": local - (view.now - r.at)})
                                for r in view.replicas if r.role == "llm"]
                ingress = [r for r in view.replicas if r.role == "ingress"]
                self.ingress_id = max(ingress, key=lambda r: r.at).replica_id if ingress else None
            except Exception as exc:  # the board restarts: keep the last view
                logger.debug("router refresh failed: %s", exc)
            idle = time.monotonic() - self._last_request > IDLE_AFTER_S
            if idle:
                self._idle.set()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_REFRESH_S if idle else REFRESH_S)
            except asyncio.TimeoutError:
                pass

    async def _keep_controller_extended(self) -> None:
        while True:
            await asyncio.sleep(EXTEND_CHECK_S)
            try:
                ports = [(r.node_id, r.unique_id, r.http_port) for r in self.reports if r.http_port is not None]
                if await ensure_controller_extended(self.app_name, ports) == "added":
                    logger.warning("the Serve controller had restarted: extended it again for app %r", self.app_name)
            except Exception as exc:  # the controller is restarting: try again next time
                logger.debug("controller extension check failed: %s", exc)
