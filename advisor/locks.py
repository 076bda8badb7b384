"""The one file-lock helper: an exclusive `flock` on a file, held for the length of a `with` block.

Used by the profile store (one writer at a time), the model provisioner (one conversion per
model) and the per-device engine start lock. Node-local: `flock` does not cross machines.
"""

from __future__ import annotations

import fcntl
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
