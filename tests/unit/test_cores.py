"""Engines on one node take disjoint core slices, whatever deployment they belong to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deployments.cores import claim_cores, least_used_slice, slices


@pytest.mark.parametrize("available,width,expected", [
    ([0, 1], 1, [[0], [1]]),
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
    ([0, 1, 2], 2, [[0, 1]]),
    ([0, 1], 4, [[0, 1]]),
    ([3], 1, [[3]]),
])
def test_slices(available, width, expected):
    assert slices(available, width) == expected


def test_the_least_used_slice_is_taken():
    assert least_used_slice([0, 1], 1, []) == [0]
    assert least_used_slice([0, 1], 1, [[0]]) == [1]
    assert least_used_slice([0, 1], 1, [[0], [1]]) == [0]
    assert least_used_slice([0, 1, 2, 3], 2, [[0, 1], [0, 1], [2, 3]]) == [2, 3]
    assert least_used_slice([0, 1], 1, [[0, 1]]) == [0]  # a two-core engine uses both


def test_two_processes_of_different_deployments_get_disjoint_cores(tmp_path):
    """What a rank inside one deployment cannot give: two models' engines on different cores."""
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        a = claim_cores(1, [0, 1], tmp_path, pid=sleepers[0].pid)
        b = claim_cores(1, [0, 1], tmp_path, pid=sleepers[1].pid)
        assert sorted([a, b]) == [[0], [1]]
        sleepers[0].kill()
        sleepers[0].wait()
        c = claim_cores(1, [0, 1], tmp_path, pid=sleepers[2].pid)  # the dead one's lease no longer counts
        assert c == a
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_an_unparsable_or_misshapen_lease_is_stale_not_trusted(tmp_path):
    import json
    import os

    (tmp_path / "1.json").write_text("{not json")
    (tmp_path / "2.json").write_text('["pid", 1]')
    (tmp_path / "3.json").write_text(json.dumps({"pid": "1", "created": 0, "cores": [0]}))
    (tmp_path / "4.json").write_text(json.dumps({"pid": os.getppid(), "created": "x", "cores": "01"}))
    assert claim_cores(1, [0, 1], tmp_path, pid=os.getpid()) == [0]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"{os.getpid()}.json"]


def test_a_lease_file_that_is_a_symlink_is_replaced_not_written_through(tmp_path):
    import os

    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("keep\n")
    (tmp_path / f"{os.getpid()}.json").symlink_to(victim)
    assert claim_cores(1, [0, 1], tmp_path, pid=os.getpid()) == [0]
    assert victim.read_text() == "keep\n"
    assert not (tmp_path / f"{os.getpid()}.json").is_symlink()


@pytest.mark.parametrize("text,cores", [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("max\n", None), ("", None),
    ("garbage", None),
])
def test_a_cgroup_v2_cpu_max_reads_as_cores(text, cores):
    from deployments.cores import v2_quota_cores

    assert v2_quota_cores(text) == cores


@pytest.mark.parametrize("quota,period,cores", [
    ("-1\n", "100000\n", None), ("50000\n", "100000\n", 0.5), ("400000", "100000", 4.0), ("x", "100000", None),
    ("100000", "0", None),
])
def test_a_cgroup_v1_cfs_quota_reads_as_cores(quota, period, cores):
    from deployments.cores import v1_quota_cores

    assert v1_quota_cores(quota, period) == cores


@pytest.mark.parametrize("affinity,quotas,expected", [
    (8, [], 8), (8, [None], 8), (8, [2.0], 2), (8, [1.5], 2), (8, [0.5], 1), (2, [16.0], 2),
    (8, [4.0, 2.5, None], 3),
])
def test_the_effective_cpu_count_is_the_affinity_capped_by_the_quota(affinity, quotas, expected):
    from deployments.cores import effective_cpu_count

    assert effective_cpu_count(affinity, quotas) == expected


def test_the_cgroup_folders_to_read_are_the_processes_own_and_its_ancestors(tmp_path):
    from deployments.cores import cgroup_dirs

    assert cgroup_dirs("0::/kubepods/pod1/c1\n", tmp_path) == [
        tmp_path / "kubepods/pod1/c1", tmp_path / "kubepods/pod1", tmp_path / "kubepods", tmp_path]
    assert cgroup_dirs("0::/\n", tmp_path) == [tmp_path]
    v1 = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert cgroup_dirs(v1, tmp_path) == [
        tmp_path / "cpu,cpuacct/docker/abc", tmp_path / "cpu,cpuacct/docker", tmp_path / "cpu,cpuacct",
        tmp_path / "cpu/docker/abc", tmp_path / "cpu/docker", tmp_path / "cpu"]


def test_a_container_quota_caps_the_cores_engines_are_sized_and_pinned_by(tmp_path):
    """Two cores' quota on an eight-core affinity: the node's replicas share two cores' worth of
    threads, not eight (a pod pinned to all eight would be throttled to two)."""
    from deployments.cores import usable_cores

    (tmp_path / "self-cgroup").write_text("0::/pod\n")
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "cpu.max").write_text("200000 100000\n")
    assert usable_cores(range(8), root=tmp_path, proc_cgroup=tmp_path / "self-cgroup") == [0, 1]
    (tmp_path / "pod" / "cpu.max").write_text("max 100000\n")
    assert usable_cores(range(8), root=tmp_path, proc_cgroup=tmp_path / "self-cgroup") == list(range(8))
    assert usable_cores(range(4), root=tmp_path / "none", proc_cgroup=tmp_path / "none") == list(range(4))
