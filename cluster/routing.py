"""Which variant and which replica take a request: the pure part of routing.

A model runs as packing variants (`Route`: which take requests, how many replicas, their batch);
the policy publishes them on the status board. Two callers route with them:
- the HTTP router (`deployments/router.py`), which Ray's HAProxy asks for every POST and which pins
  the request to one LLM replica's own HTTP server (`choose_replica`), from what each replica
  reports about itself (`ReplicaReport`: where HAProxy knows it, its batch, the requests it holds)
  plus the requests the router sent it that its last report did not count yet (`Assignments`);
- the Python ingress (`deployments/ingress.py`), which sends a request to a variant's Serve handle
  (`choose_variant`) and waits while its variant still accepts (`should_reroute`).
Both put a request where the most room is free: a replica's room is its `max_num_seqs` minus what
it holds; a variant's, its running replicas times their batch minus what is in flight there.
Before either, a body is held to `RequestLimits` (`body_refusal`): the router, the one ingress and a
replica's front each read and parse whole bodies, so one huge or absurdly nested body would cost
them memory, time or a RecursionError; such a body goes to no replica and gets vLLM's error format.
A request whose replica (or its engine) died while it had the request is sent again at most once:
`retry_decision`, over the deaths that body met (`DeathLedger`, across a client's resends too).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict, deque
from typing import Callable, Literal, NamedTuple, Optional

import numpy as np
from pydantic import BaseModel, ByteSize, ConfigDict, Field

from cluster.policy import Route

# A router's pending count for a replica that never reported the request (the client went away
# before HAProxy forwarded it, or HAProxy sent it elsewhere) is forgotten after this long.
ASSIGNMENT_TTL_S = 5.0
# A replica that has not reported for this long is gone (its process died, or the board restarted
# and it has not reported again yet): no request is pinned to it.
REPORT_STALE_S = 8.0
# Request bodies whose tries met a replica's or engine's death are remembered this long after the
# last one, at most this many of them (the least recently dead go first).
DEATHS_TTL_S = 600.0
DEATHS_MAX_ENTRIES = 10_000


class ReplicaReport(BaseModel):
    """What one replica tells the routers about itself (through the status board)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replica_id: str = Field(description="Serve's actor name of the replica: the key of HAProxy's server map.")
    role: Literal["llm", "ingress"] = Field(
        "llm", description="An LLM replica with its own HTTP server, or the ingress (the Python path).")
    model: str = Field("", description="Served name of the replica's model (empty for the ingress).")
    deployment: str = Field("", description="The replica's deployment, i.e. its packing variant.")
    max_num_seqs: int = Field(0, ge=0, description="Sequences its engine decodes at once.")
    ongoing: int = Field(0, ge=0, description="HTTP requests it holds now.")
    received: int = Field(0, ge=0, description="HTTP requests it took since it started.")
    engine_running: int = Field(0, ge=0, description="Sequences its engine decodes now (vLLM's scheduler).")
    stopping: bool = Field(False, description="It is stopping (or its engine died): pin nothing more to it.")
    node_id: str = Field("", description="Ray node it runs on.")
    unique_id: str = Field("", description="Serve's short replica id (the key of the controller's port book).")
    http_port: Optional[int] = Field(None, description="Port of its own HTTP server (None: it has none).")
    at: float = Field(description="When it took this reading (unix s).")


class Assignments:
    """Requests this router pinned to each replica that the replica's last report did not count.

    A report counts every request the replica took (`received`); the difference to the last report
    takes that many of the oldest pins off the pending list, and pins older than `ttl_s` are
    dropped (they never arrived). A replica's load is then `ongoing + pending`: a burst pinned
    between two reports spreads instead of landing on the replica that looked emptiest."""

    def __init__(self, ttl_s: float = ASSIGNMENT_TTL_S):
        self.ttl_s = ttl_s
        self._sent: dict[str, deque[float]] = {}
        self._received: dict[str, int] = {}

    def sent(self, replica_id: str, now: float) -> None:
        self._sent.setdefault(replica_id, deque()).append(now)

    def observe(self, report: ReplicaReport) -> None:
        last = self._received.get(report.replica_id)
        self._received[report.replica_id] = report.received
        if last is None or report.received < last:  # first report, or a new replica under the same id
            return
        sent = self._sent.get(report.replica_id)
        for _ in range(min(report.received - last, len(sent or ()))):
            sent.popleft()

    def pending(self, replica_id: str, now: float) -> int:
        sent = self._sent.get(replica_id)
        if not sent:
            return 0
        while sent and now - sent[0] > self.ttl_s:
            sent.popleft()
        return len(sent)

    def forget_except(self, replica_ids: set[str]) -> None:
        for gone in set(self._sent) - replica_ids:
            del self._sent[gone]
        for gone in set(self._received) - replica_ids:
            del self._received[gone]


def choose_replica(model: str, routes: list[Route], reports: list[ReplicaReport], pending: dict[str, int],
                   now: float, stale_after_s: float = REPORT_STALE_S) -> Optional[ReplicaReport]:
    """The LLM replica of `model` with the most free room, among the fresh, not stopping replicas of
    the variants that take requests (`routes`, the model's); `pending` by replica id (`Assignments`).
    None when there is none: the caller sends the request the Python way (the ingress), which
    waits for a replica or answers the client."""
    accepting = {r.deployment for r in routes if r.accepting}
    live = [r for r in reports if r.role == "llm" and r.model == model and not r.stopping
            and r.deployment in accepting and now - r.at <= stale_after_s]
    if not live:
        return None

    def room(r: ReplicaReport) -> tuple[int, int, str]:
        load = r.ongoing + pending.get(r.replica_id, 0)
        return (r.max_num_seqs - load, -load, r.replica_id)

    return max(live, key=room)


def choose_variant(routes: list[Route], inflight: dict[str, int]) -> Optional[str]:
    """The deployment of the accepting variant with the most free capacity (running replicas x
    batch minus this ingress's requests in flight there; `inflight` by deployment). A variant with
    no running replica, or one that drains, only when nothing else can take the request: the
    request then waits there instead of failing."""
    live = [r for r in routes if r.accepting and r.running > 0]
    pool = live or [r for r in routes if r.running > 0] or [r for r in routes if r.accepting] or routes
    if not pool:
        return None
    best = max(pool, key=lambda r: (max(1, r.running) * r.max_num_seqs - inflight.get(r.deployment, 0), -r.n))
    return best.deployment


def should_reroute(routes: list[Route], deployment: str) -> bool:
    """A request still waiting for its first answer at a variant (`deployment`) goes elsewhere when
    that variant stopped taking requests (it drains, or lost every replica) while another runs and
    accepts: a request queued at a variant that is scaled to zero would otherwise wait for good."""
    mine = next((r for r in routes if r.deployment == deployment), None)
    if mine is not None and mine.accepting and mine.running > 0:
        return False
    return any(r.deployment != deployment and r.accepting and r.running > 0 for r in routes)


RetryVerdict = Literal["retry", "unavailable", "refuse"]


def retry_decision(deaths: int, tries: int, attempts: int, max_deaths: int) -> RetryVerdict:
    """What becomes of a request none of whose `tries` was answered. `deaths`: the deaths of a
    replica or its engine that had the request (delivered to it, queued or running: a replica cannot
    tell which), counting its earlier sends of the same body (`DeathLedger`); a replica or engine that
    was dead before the request reached it counts none. 'refuse' (answered with an error, sent
    nowhere else) at `max_deaths`: a body that crashes every engine it reaches (in prefill, or out of
    memory) would otherwise end one replica per try. 'unavailable' (503) after `attempts` tries;
    else 'retry'."""
    if deaths >= max_deaths:
        return "refuse"
    if tries >= attempts:
        return "unavailable"
    return "retry"


def request_fingerprint(*parts: bytes) -> str:
    """A request's identity for `DeathLedger`: a hash of what the replica gets (path, body)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


class DeathLedger:
    """The replica and engine deaths each request body (`request_fingerprint`) met while a replica
    had it, kept after its request ended unanswered, so a client's resend of the same body starts
    from them (`retry_decision`). A body that got an answer is forgotten at once; one with no new
    death for `ttl_s`, too; at most `max_entries` bodies are kept (the least recently dead go first).
    A request reads the ledger when it starts and writes it when it ends: concurrent requests with
    the same body (a benchmark's, a prober's) do not count each other's deaths, which may be one."""

    def __init__(self, max_entries: int = DEATHS_MAX_ENTRIES, ttl_s: float = DEATHS_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries, self.ttl_s, self._clock = max_entries, ttl_s, clock
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (deaths, at), oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def deaths(self, key: str) -> int:
        self._expire()
        entry = self._entries.get(key)
        return entry[0] if entry is not None else 0

    def settle(self, key: str, deaths: int) -> None:
        """A request with this body ended unanswered after `deaths` deaths in all (its earlier sends'
        included): the most the ledger knows of is kept."""
        if deaths <= 0:
            return
        self._expire()
        known = self._entries.pop(key, (0, 0.0))[0]
        self._entries[key] = (max(known, deaths), self._clock())
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self, key: str) -> None:
        """A request with this body was answered: its earlier deaths were not its doing."""
        self._entries.pop(key, None)

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            key, (_, at) = next(iter(self._entries.items()))
            if now - at < self.ttl_s:
                return
            del self._entries[key]


class RequestLimits(BaseModel):
    """What one request body may be. Neither vLLM's server nor FastAPI/Starlette (`max_body_size`
    None) nor uvicorn bounds a body, and all of them hold it whole: the defaults are far above what
    a client sends and bound what one request can cost the processes that read it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_body_bytes: ByteSize = Field(
        32 * 2**20, ge=2**10, le=2**30,
        description="largest request body, e.g. 32MiB (1KiB..1GiB); a larger one gets 413 unread. The default holds "
                    "vLLM's largest completions batch (1024 prompts) of token ids at a 2048-token context (~13 MiB) "
                    "and several base64 images; raise it for more")
    max_json_depth: int = Field(
        128, ge=16, le=512,
        description="deepest nesting of JSON objects and arrays in a request body, 16..512; deeper gets 400. The "
                    "default is above what vLLM accepts (a structured-output schema of 64 levels, 80 in a structural "
                    "tag, inside a request's own few), and below Python's parser limit (about 1000)")


class Refusal(NamedTuple):
    """A request answered without a replica, in vLLM's error format."""

    status: int
    message: str
    err_type: str


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_DEPTH_PIECE = 2**20


def json_nesting_exceeds(body: bytes, limit: int) -> bool:
    """True when JSON objects and arrays in `body` nest deeper than `limit`, found without parsing it
    (a parser recurses once per level: Python's stops with a RecursionError near 1000). Brackets in
    strings are text; the common body, with at most `limit` brackets in all, costs two counts."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    level = 0  # in pieces: a few MiB of memory at a time, and an early end
    for start in range(0, len(brackets), _DEPTH_PIECE):
        piece = np.frombuffer(brackets, np.uint8, count=min(_DEPTH_PIECE, len(brackets) - start), offset=start)
        depth = np.cumsum(_BRACKET_STEP[piece], dtype=np.int32)
        if level + int(depth.max()) > limit:
            return True
        level += int(depth[-1])
    return False


def body_refusal(body: bytes, limits: RequestLimits, parsed: bool) -> Optional[Refusal]:
    """413 for a body over `limits.max_body_bytes` (a reader stops one byte past it, so a body that
    long was cut: it is never served); for a body that is parsed (`parsed`: vLLM's POSTs), 400 when
    it nests deeper than `limits.max_json_depth`. None: the body may go on."""
    if len(body) > limits.max_body_bytes:
        return Refusal(413, f"the request body is larger than {limits.max_body_bytes} bytes, this server's limit "
                            f"(limits.max_body_bytes in the application's args): send a smaller body, e.g. fewer "
                            f"prompts or images per request", "RequestEntityTooLargeError")
    if parsed and json_nesting_exceeds(body, limits.max_json_depth):
        return Refusal(400, f"the request body nests JSON objects and arrays deeper than {limits.max_json_depth} "
                            f"levels, this server's limit (limits.max_json_depth in the application's args)",
                       "BadRequestError")
    return None


def model_of(body: bytes) -> Optional[str]:
    """The `model` a JSON request body names, or None (not JSON, not an object, no model, or nested
    deeper than Python's parser allows)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None


class ServedModel(BaseModel):
    """A model the app serves under one name (shown by GET /v1/models)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    max_model_len: Optional[int]
    replicas: int
    keys: list[str] = Field(default_factory=list, description="The policy's models that serve it: one per device "
                                                              "type it runs on (empty: just `name`).")

    @property
    def policy_models(self) -> list[str]:
        return self.keys or [self.name]


def merge_routes(routes: dict[str, list[Route]], models: list[ServedModel]) -> dict[str, list[Route]]:
    """The policy's routes (keyed by its models) by served name: a model served on several device
    types gets the variants of every type."""
    return {m.name: [r for key in m.policy_models for r in routes.get(key, [])] for m in models
            if any(key in routes for key in m.policy_models)}
