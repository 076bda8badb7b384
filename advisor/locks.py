"""The one file-lock helper: an exclusive `flock` on a file, held for the length of a `with` block.

Used by the profile store (one writer at a time), the model provisioner (one conversion per
model) and the per-device engine start lock. Node-local: `flock` does not cross machines; the
profile store, which may be a folder that several machines mount, also takes `create_lock`
(exclusive creation of a file holds on NFS too).

Node-local locks and leases live in `node_lock_dir()`: `<tempdir>/plateau-<uid>`, created 0700 and
refused when it is not this user's own private folder. A folder shared by every user (as the temp
dir is) would let another local user create it first and hold every lock in it, or plant links
that redirect our writes; so lock and lease files are also never opened through a symbolic link.
The folder is per user, not per login session (`$XDG_RUNTIME_DIR`): a CLI profile in a shell and a
Ray replica started by a service must take the same device lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

LOCK_POLL_S = 0.1
logger = logging.getLogger(__name__)


class LockDirError(PermissionError):
    """The node-local lock folder exists but is not this user's private folder."""


class LockPathError(PermissionError):
    """A lock or lease file is a symbolic link (never followed: it could point anywhere)."""


def lock_dir_problem(mode: int, owner: int, uid: int) -> Optional[str]:
    """Why a lock folder with `lstat` mode `mode` owned by `owner` is unsafe for user `uid`; None if it is fine."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if not stat.S_ISDIR(mode):
        return "not a folder"
    if owner != uid:
        return f"owned by uid {owner}, not by this user (uid {uid})"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(mode):o})"
    return None


def node_lock_dir(*parts: str, base: Optional[Path] = None) -> Path:
    """This user's private folder for node-local locks and leases (`<tempdir>/plateau-<uid>/<parts>`),
    created 0700; raises LockDirError naming the folder when it, or any of `parts`, is not ours alone."""
    top = Path(base if base is not None else tempfile.gettempdir()) / f"plateau-{os.getuid()}"
    folders = [top.joinpath(*parts[:i]) for i in range(len(parts) + 1)]
    for folder in folders:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(folder)
        problem = lock_dir_problem(st.st_mode, st.st_uid, os.getuid())
        if problem:
            raise LockDirError(
                f"{folder}: {problem}; plateau-serve keeps its node-local locks there and needs it private to "
                f"this user: remove it (as its owner or root) and it is made again, mode 0700, or point TMPDIR "
                f"at a folder of this user's own")
    return folders[-1]


def _open_nofollow(path: Path, flags: int, mode: int = 0o666) -> int:
    """`os.open` that refuses a symbolic link at `path` with LockPathError."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockPathError(f"{path}: a symbolic link, which plateau-serve never follows for a lock or lease "
                                f"file; remove it (the lock is made again)") from None
        raise


def read_nofollow(path: Path, limit: int = 4096) -> str:
    """A small lock or lease file's text, never through a symbolic link (LockPathError)."""
    fd = _open_nofollow(path, os.O_RDONLY)
    try:
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def write_nofollow(path: Path, text: str) -> None:
    """Replace a lease file with `text` (mode 0600): a link or file already there is removed first,
    never written through."""
    path.unlink(missing_ok=True)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def lock_holder(path: Path) -> Optional[str]:
    """The pid the holder of `file_lock(path)` wrote into it, if there is one."""
    try:
        return read_nofollow(path).strip() or None
    except OSError:
        return None


@contextmanager
def file_lock(path: Path, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its folder); wait forever, or at most
    `timeout_s` and then raise TimeoutError naming the lock file and its holder. The holder writes
    its pid into the file, so a wait that ends can say which process to look at. A symbolic link at
    `path` is refused (LockPathError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{path}: still locked by another process after {timeout_s:g} s "
                                           f"(held by process {lock_holder(path) or 'unknown'})") from None
                    time.sleep(LOCK_POLL_S)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_stale(mtime: float, now: float, stale_s: float) -> bool:
    """A lock file last written more than `stale_s` ago was left by a holder that died."""
    return now - mtime > stale_s


def _read_bytes(path: Path) -> Optional[bytes]:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _set_aside(path: Path) -> Optional[Path]:
    """Atomically move the lock file at `path` to a name of its own (None: nothing was there).
    Of several processes that do this at once, each moves a different file or none."""
    aside = path.with_name(f"{path.name}.aside-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    return aside


def _put_back(aside: Path, path: Path) -> None:
    """Return a lock file set aside by mistake to `path` (a hard link: never over a lock made meanwhile)."""
    try:
        os.link(aside, path)
    except FileExistsError:
        logger.warning("%s: a live lock was set aside while another writer created a new one; both may "
                       "write until one of them ends", path)
    finally:
        os.unlink(aside)


def _take_over_if_stale(path: Path, stale_s: float) -> None:
    """Remove the lock at `path` if it is stale. The lock is set aside first and only deleted if the
    file moved is itself stale: a waiter whose judgement is outdated (another took the stale lock
    over and holds a fresh one) puts the fresh one back instead of removing it."""
    try:
        if not is_stale(os.stat(path).st_mtime, time.time(), stale_s):
            return
    except FileNotFoundError:
        return
    aside = _set_aside(path)
    if aside is None:
        return  # another waiter took it over first
    if is_stale(os.stat(aside).st_mtime, time.time(), stale_s):
        os.unlink(aside)
    else:
        _put_back(aside, path)


def _release(path: Path, mine: bytes) -> bool:
    """Remove the lock at `path` only if it still holds our token; True when it did."""
    if _read_bytes(path) != mine:
        return False
    aside = _set_aside(path)
    if aside is None:
        return False
    if _read_bytes(aside) == mine:
        os.unlink(aside)
        return True
    _put_back(aside, path)  # taken over between our read and the move
    return False


@contextmanager
def create_lock(path: Path, timeout_s: float = 600.0, stale_s: float = 120.0) -> Iterator[None]:
    """Hold `path` by creating it exclusively (O_EXCL, which holds on a folder several machines
    mount), with a token of this hold in it; a lock file older than `stale_s` was left by a holder
    that died and is taken over (`_take_over_if_stale`). Release removes the file only while it
    still holds our token. Hold it briefly: a holder must finish well within `stale_s`."""
    path = Path(path)
    mine = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}\n".encode()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            _take_over_if_stale(path, stale_s)
            if not path.exists():
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: held by another writer for over {timeout_s:g} s (remove it if no "
                                   f"writer is alive)") from None
            time.sleep(LOCK_POLL_S)
    try:
        os.write(fd, mine)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        if not _release(path, mine):
            logger.warning("%s: taken over by another writer while this one (pid %d) held it for over %g s",
                           path, os.getpid(), stale_s)
