"""Where the profile store's files live: a folder on this machine (or one every node mounts), or
an object-storage URL (`s3://bucket/prefix`) read through fsspec.

Both give the store the same three things: read a whole file (None if absent), replace a whole
file so that readers see the old or the new one and never half of it, and one writer at a time.
- A folder: writes go to a temporary file renamed into place; writers hold `flock` (this
  machine) and an exclusively created lock file (`O_EXCL` holds across machines on NFS).
- A URL: an object write becomes visible whole (also when uploaded in parts); writers hold a lock
  object created with fsspec's exclusive create (`pipe_file(mode="create")`: S3's
  `If-None-Match: *`, s3fs 2024.12 or later), which fails while another writer holds it.
  Filesystems without a dependable atomic exclusive create are refused, GCS among them: gcsfs
  calls its `mode="create"` experimental and untested against its emulator, and on zonal buckets
  it overwrites (gcsfs/extended_gcsfs.py), so two writers could both hold the lock.
A lock older than `stale_s` by its holder's clock (the holder died) is taken over, as the folder's
is: the lock is read again just before it is deleted and only deleted if unchanged, and a holder
releases only its own, so a takeover races only within the time of one delete request (and clocks
more than `stale_s` apart would take a live lock).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from advisor.locks import LOCK_POLL_S, create_lock, file_lock

logger = logging.getLogger(__name__)

LOCK_FILE = ".write-lock"
# fsspec filesystems whose `pipe_file(mode="create")` is one atomic request: s3fs (`If-None-Match: *`;
# S3-compatible servers must honour it) and the in-memory one (tests)
EXCLUSIVE_CREATE = {"s3", "s3a", "memory"}
# The first release of each filesystem package whose `pipe_file` takes mode="create" (s3fs PR 917)
MIN_PACKAGE = {"s3": ("s3fs", "2024.12.0"), "s3a": ("s3fs", "2024.12.0")}
REFUSED = {
    "gs": "gcsfs's exclusive create is experimental and overwrites on zonal buckets, so two writers could "
          "both hold the store's lock",
}
REFUSED["gcs"] = REFUSED["gs"]


class StoreMissing(FileNotFoundError):
    """A configured shared profile store folder is not there (not mounted on this node)."""


class StoreUrlError(ValueError):
    """A profile store location that is not accepted: a relative path, a filesystem without an atomic
    exclusive create, no bucket, or (where the store opens) its filesystem's package missing."""


def is_url(where: Union[str, Path]) -> bool:
    return "://" in str(where)


def check_url(url: str, need_package: bool = False) -> None:
    """Raise StoreUrlError unless `url` names a store on a filesystem whose exclusive create is atomic;
    with `need_package`, also unless that filesystem's package is installed on this machine."""
    import fsspec

    protocol, _, rest = url.partition("://")
    if "::" in url:
        raise StoreUrlError(f"{url}: chained URLs (caching layers) are not supported for the profile store")
    if protocol in REFUSED:
        raise StoreUrlError(f"{url}: {protocol}:// is not supported: {REFUSED[protocol]}; use s3:// (S3, or a "
                            f"server that honours If-None-Match: *) or a folder every node mounts (NFS)")
    if protocol not in EXCLUSIVE_CREATE:
        raise StoreUrlError(f"{url}: {protocol}:// is not supported: the store's writers need an atomic exclusive "
                            f"create, which fsspec gives on {', '.join(sorted(EXCLUSIVE_CREATE - {'memory'}))}; "
                            f"for others mount the storage and give the folder's path")
    if not rest.strip("/"):
        raise StoreUrlError(f"{url}: name a bucket (and a prefix), e.g. {protocol}://my-bucket/plateau/profiles")
    if not need_package:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:  # fsspec's message names the package, e.g. "Install s3fs to access S3"
        raise StoreUrlError(f"{url}: {exc} on {socket.gethostname()}; every node that profiles or plans needs it "
                            f"(pip install \"plateau-serve[s3]\" there, or add s3fs to the app's runtime_env "
                            f"pip list)") from None
    if protocol in MIN_PACKAGE:
        from importlib.metadata import PackageNotFoundError, version

        try:
            old = package_too_old(protocol, version(MIN_PACKAGE[protocol][0]))
        except PackageNotFoundError:
            old = None
        if old:
            raise StoreUrlError(f"{url}: {old} on {socket.gethostname()}")


def package_too_old(protocol: str, installed: str) -> Optional[str]:
    """Why the installed filesystem package for `protocol` cannot make the store's lock (its
    `pipe_file` has no exclusive create yet), naming the fix; None when it can."""
    from packaging.version import InvalidVersion, Version

    package, minimum = MIN_PACKAGE[protocol]
    try:
        if Version(installed) >= Version(minimum):
            return None
    except InvalidVersion:
        return None
    return (f"{package} {installed} has no exclusive create (pipe_file mode=\"create\"), which the store's lock "
            f"needs: pip install \"{package}>={minimum}\" there")


def check_where(where: str) -> None:
    """What the config accepts as `profile_store` (packages are checked where the store is opened)."""
    if where.startswith("file://"):
        where = where.removeprefix("file://")
    elif is_url(where):
        check_url(where)
        return
    if not os.path.isabs(where):
        raise StoreUrlError("must be an absolute folder path that every node mounts, or a URL such as "
                            "s3://bucket/prefix")


class LocalFolder:
    """A folder on this machine (or one every node mounts)."""

    def __init__(self, root: Path, create: bool):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StoreMissing(f"profile store {self.root} does not exist on {socket.gethostname()}: mount the "
                               f"shared folder there, or drop profile_store to keep profiles per node")

    def name(self, file: str) -> str:
        return str(self.root / file)

    def read(self, file: str) -> Optional[bytes]:
        try:
            return (self.root / file).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, file: str, data: bytes) -> None:
        path = self.root / file
        tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)

    @contextmanager
    def writer(self) -> Iterator[None]:
        # flock for this machine's writers, an exclusively created file for other machines' (shared folder)
        with file_lock(self.root / ".lock"), create_lock(self.root / LOCK_FILE):
            yield


class UrlFolder:
    """A prefix in object storage whose exclusive create is atomic (S3; fsspec's in-memory
    filesystem for tests)."""

    def __init__(self, url: str, create: bool = True, timeout_s: float = 600.0, stale_s: float = 120.0):
        import fsspec.core

        check_url(url, need_package=True)
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.timeout_s, self.stale_s = timeout_s, stale_s
        if not create:
            self._check_reachable()

    def _check_reachable(self) -> None:
        """A shared store's bucket must be there and readable from this node (a typo or missing
        credentials fail now, not after a profile)."""
        bucket = self.root.lstrip("/").split("/", 1)[0]
        try:
            there = self.fs.exists(bucket)
        except Exception as exc:  # no credentials, no network, access denied
            raise StoreMissing(f"profile store {self.url}: cannot reach {bucket!r} from {socket.gethostname()}: "
                               f"{type(exc).__name__}: {exc}") from None
        if not there:
            raise StoreMissing(f"profile store {self.url}: bucket {bucket!r} does not exist or is not visible from "
                               f"{socket.gethostname()}: create it, or fix profile_store")

    def name(self, file: str) -> str:
        return f"{self.url}/{file}"

    def _path(self, file: str) -> str:
        return f"{self.root}/{file}"

    def read(self, file: str) -> Optional[bytes]:
        try:
            return self.fs.cat_file(self._path(file))
        except FileNotFoundError:
            return None

    def write(self, file: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(file), data)

    @contextmanager
    def writer(self) -> Iterator[None]:
        lock = self._path(LOCK_FILE)
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.timeout_s
        while True:
            mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                               "at": time.time()}).encode()
            if self._create(lock, mine):
                break
            held = self.read(LOCK_FILE)
            if held is None:
                continue  # released meanwhile
            if self._stale(held):
                self._remove_if(lock, held)
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name(LOCK_FILE)}: held by another writer for over {self.timeout_s:g} s "
                                   f"(remove it if no writer is alive)")
            time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            if not self._remove_if(lock, mine):
                logger.warning("%s: taken over by another writer while this one (pid %d) held it for over %g s",
                               self.name(LOCK_FILE), os.getpid(), self.stale_s)

    def _create(self, lock: str, stamp: bytes) -> bool:
        """Create the lock object only if there is none: True when this call made it."""
        try:
            self.fs.pipe_file(lock, stamp, mode="create")
            return True
        except FileExistsError:  # S3 412 on If-None-Match
            return False
        except OSError as exc:  # S3 answers a create racing another with 409, which s3fs does not map
            if "ConditionalRequestConflict" in str(exc):
                return False
            raise

    def _remove_if(self, lock: str, stamp: bytes) -> bool:
        """Delete the lock if it still is `stamp` (read again just before): a writer never deletes a
        lock that another one took meanwhile. True when it was `stamp`."""
        if self.read(LOCK_FILE) != stamp:
            return False
        try:
            self.fs.rm_file(lock)
        except FileNotFoundError:
            pass
        return True

    def _stale(self, held: bytes) -> bool:
        """The lock was taken more than `stale_s` ago by its holder's clock (it died holding it)."""
        try:
            return time.time() - float(json.loads(held)["at"]) > self.stale_s
        except (ValueError, KeyError, TypeError):
            return True  # not one of ours, or cut short: nobody would release it


Location = Union[LocalFolder, UrlFolder]


def location(where: Union[str, Path], create: bool = True) -> Location:
    """The store's files at `where`: a URL (`file:///abs/path` is a local folder), else a folder path."""
    text = str(where)
    if text.startswith("file://"):
        check_where(text)
        return LocalFolder(Path(text.removeprefix("file://")), create)
    if is_url(text):
        return UrlFolder(text, create)
    return LocalFolder(Path(text), create)
