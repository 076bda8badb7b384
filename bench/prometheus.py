"""A Prometheus server scraping one Ray cluster, started the way Ray documents it.

    with Prometheus.for_ray_session(cluster.temp_dir, work, env=cluster.env()) as prom:
        ...  # prom.url: the HTTP API

Ray's dashboard writes a scrape config for its session to
`<temp dir>/session_latest/metrics/prometheus/prometheus.yml` (every node's metrics export, found
through `<session>/prom_metrics_service_discovery.json`); this runs the `prometheus` binary on
that file with a storage folder and a free port of its own, and stops it on leaving the block.
Started with the cluster's environment (`OwnCluster.env()`), it also carries the cluster's tag,
so the cluster's own stop ends it if this process is killed first.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import httpx

from bench.own_cluster import free_port

INSTALL_HINT = ("install Prometheus: Debian/Ubuntu `apt-get install prometheus` (`make test` does it through "
                "scripts/test-tools.sh when run as root), elsewhere the release binary from "
                "https://prometheus.io/download/ on PATH")


class PrometheusUnavailable(RuntimeError):
    """No `prometheus` binary, no scrape config from Ray, or it did not become ready."""


def prometheus_binary() -> Optional[str]:
    return shutil.which("prometheus")


def ray_scrape_config(temp_dir: str | Path, timeout_s: float = 60.0) -> Path:
    """The scrape config Ray's dashboard writes for the session under `temp_dir` (waits for it)."""
    path = Path(temp_dir) / "session_latest" / "metrics" / "prometheus" / "prometheus.yml"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise PrometheusUnavailable(f"Ray wrote no scrape config at {path} within {timeout_s:.0f}s "
                                        "(is the cluster's dashboard running?)")
        time.sleep(0.5)
    return path


class Prometheus:
    def __init__(self, config: Path, work: Path, env: Optional[dict] = None, port: Optional[int] = None,
                 ready_timeout_s: float = 60.0):
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusUnavailable(f"no `prometheus` on PATH: {INSTALL_HINT}")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(work) / "prometheus.log"
        self._cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={Path(work) / 'prometheus-data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"]
        self._env, self._ready_timeout_s = env, ready_timeout_s
        self._proc: Optional[subprocess.Popen] = None

    @classmethod
    def for_ray_session(cls, temp_dir: str | Path, work: Path, env: Optional[dict] = None) -> "Prometheus":
        return cls(ray_scrape_config(temp_dir), work, env=env)

    def __enter__(self) -> "Prometheus":
        with open(self.log, "w") as out:
            self._proc = subprocess.Popen(self._cmd, env=self._env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + self._ready_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise PrometheusUnavailable(f"prometheus exited {self._proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise PrometheusUnavailable(f"prometheus not ready after {self._ready_timeout_s:.0f}s; see {self.log}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def targets_up(self) -> int:
        """Scrape targets whose last scrape succeeded."""
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return sum(1 for t in body["data"]["activeTargets"] if t.get("health") == "up")
