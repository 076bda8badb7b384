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
