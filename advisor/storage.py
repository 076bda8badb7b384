"""Where the profile store's files live: a folder on this machine (or one every node mounts), or
any fsspec URL (`s3://bucket/prefix`, `gs://...`, `abfs://...`) where users have object storage.

Both give the store the same three things: read a whole file (None if absent), replace a whole
file so that readers see the old or the new one and never half of it, and one writer at a time.
- A folder: writes go to a temporary file renamed into place; writers hold `flock` (this
  machine) and an exclusively created lock file (`O_EXCL` holds across machines on NFS).
- A URL: a whole-object PUT already replaces atomically; writers hold a lock object created with
  fsspec's exclusive create (`pipe_file(mode="create")`: S3's `If-None-Match: *`, GCS's
  `ifGenerationMatch=0`), which fails with FileExistsError while another writer holds it. A lock
  older than `stale_s` (its holder died) is taken over, as the folder's is.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from advisor.locks import LOCK_POLL_S, create_lock, file_lock


class StoreMissing(FileNotFoundError):
    """A configured shared profile store folder is not there (not mounted on this node)."""


class StoreUrlError(ValueError):
    """A profile store URL whose filesystem fsspec does not know, or whose package is not installed."""


def is_url(where: Union[str, Path]) -> bool:
    return "://" in str(where)


def check_url(url: str) -> None:
    """Raise StoreUrlError unless fsspec can open `url` on this machine (its package installed)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StoreUrlError(f"{url}: fsspec knows no filesystem {protocol!r}:// (see fsspec's "
                            f"known_implementations)") from None
    except ImportError as exc:  # fsspec's message names the package, e.g. "Install s3fs to access S3"
        raise StoreUrlError(f"{url}: {exc}; every node that profiles or plans needs it (pip install it there, "
                            f"or add it to the app's runtime_env pip list)") from None


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
        with file_lock(self.root / ".lock"), create_lock(self.root / ".write-lock"):
            yield


class UrlFolder:
    """A prefix in object storage (or any filesystem fsspec reaches by URL)."""

    def __init__(self, url: str, timeout_s: float = 600.0, stale_s: float = 120.0):
        import fsspec.core

        check_url(url)
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.timeout_s, self.stale_s = timeout_s, stale_s

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
        lock = self._path(".write-lock")
        deadline = time.monotonic() + self.timeout_s
        while True:
            stamp = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}).encode()
            try:
                self.fs.pipe_file(lock, stamp, mode="create")
                break
            except FileExistsError:
                if self._stale(lock):
                    self.fs.rm_file(lock)
                    continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name('.write-lock')}: held by another writer for over {self.timeout_s:g} s "
                                   f"(remove it if no writer is alive)")
            time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            self.fs.rm_file(lock)

    def _stale(self, lock: str) -> bool:
        """The lock was taken more than `stale_s` ago by its holder's clock (it died holding it)."""
        try:
            held_since = json.loads(self.fs.cat_file(lock))["at"]
        except FileNotFoundError:
            return False  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            return True  # not one of ours, or cut short: nobody can release it
        return time.time() - float(held_since) > self.stale_s


Location = Union[LocalFolder, UrlFolder]


def location(where: Union[str, Path], create: bool = True) -> Location:
    """The store's files at `where`: a URL (`file://` is a local folder), else a folder path."""
    text = str(where)
    if text.startswith("file://"):
        return LocalFolder(Path(text.removeprefix("file://")), create)
    if is_url(text):
        return UrlFolder(text)
    return LocalFolder(Path(text), create)
