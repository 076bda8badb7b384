"""Where state that must outlive an actor or the Serve controller is kept: Ray's internal KV store.

The status board (placement, routes) and the autoscaling policy (re-pack phase, clocks,
cooldowns) write their state here as JSON and read it back when their process restarts. The
store is two methods, so tests inject a dict-backed fake by constructor. `get` returns None only
for a key never written; a read that cannot tell (no connection to the KV, a GCS error) raises,
so that a reader never takes "could not read" for "nothing saved" and writes a fresh state over
the saved one.
"""

from __future__ import annotations

from typing import Optional, Protocol

KV_NAMESPACE = "plateau"


class StateStoreUnavailable(RuntimeError):
    """The state store cannot be read or written from this process now."""


class StateStore(Protocol):
    def get(self, key: str) -> Optional[bytes]:
        """The value saved under `key`; None if none was; raises when that cannot be told."""
        ...

    def put(self, key: str, value: bytes) -> None: ...


class RayInternalKV:
    """Ray's internal KV (held by the GCS): survives actor and controller restarts, not the cluster."""

    def __init__(self, namespace: str = KV_NAMESPACE):
        self.namespace = namespace

    def get(self, key: str) -> Optional[bytes]:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            raise StateStoreUnavailable(f"Ray's internal KV is not connected in this process: cannot read {key!r}")
        return _internal_kv_get(key, namespace=self.namespace)

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental.internal_kv import _internal_kv_initialized, _internal_kv_put

        if not _internal_kv_initialized():
            raise StateStoreUnavailable(f"Ray's internal KV is not connected in this process: cannot write {key!r}")
        _internal_kv_put(key, value, overwrite=True, namespace=self.namespace)


def board_key(app: str) -> str:
    return f"board/{app}"


def policy_key(app: str) -> str:
    return f"policy/{app}"
