"""Unit tests are pure: none may start or join a Ray cluster. One that did would leave this process
connected, and every later `ray.init` of the suite (tests/ray runs in the same process) would fail."""
import sys

import pytest


@pytest.fixture(autouse=True)
def no_ray_left_connected():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this unit test started or joined Ray (a real board, handle or actor call): patch it out")
