"""The one file-lock helper: an exclusive `flock` on a file, held for the length of a `with` block.

Used by the profile store (one writer at a time), the model provisioner (one conversion per
model) and the per-device engine start lock. Node-local: `flock` does not cross machines; the
profile store, which may be a folder that several machines mount, also takes `create_lock`
(exclusive creation of a file holds on NFS too).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

LOCK_POLL_S = 0.1


@contextmanager
def file_lock(path: Path, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its folder); wait forever, or at most
    `timeout_s` and then raise TimeoutError naming the lock file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        if timeout_s is None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{path}: still locked by another process after {timeout_s:g} s") from None
                    time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def create_lock(path: Path, timeout_s: float = 600.0, stale_s: float = 120.0) -> Iterator[None]:
    """Hold `path` by creating it exclusively (O_EXCL, which holds on a folder several machines
    mount); a lock file older than `stale_s` was left by a holder that died and is removed. Hold
    it briefly: a holder must finish well within `stale_s`."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime > stale_s:
                    path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: held by another writer for over {timeout_s:g} s (remove it if no "
                                   f"writer is alive)") from None
            time.sleep(LOCK_POLL_S)
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)
