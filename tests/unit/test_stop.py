"""Which processes `plateau stop` ends: live `serve run` drivers of the cluster on this machine."""

import pytest

from deployments.stop import JobRow, pick_drivers, serve_run_command

SERVE_RUN = ["/repo/.venv/bin/python", "/repo/.venv/bin/serve", "run", "config.yaml"]
CMDLINES = {
    10: SERVE_RUN,
    11: ["/repo/.venv/bin/python", "bench/repack.py"],  # a driver, not serve run
    12: ["serve", "run", "config.gpu.yaml"],
    13: ["/usr/bin/python3", "-m", "serve", "status"],
}


def test_serve_run_is_the_serve_console_script_with_run():
    assert serve_run_command(SERVE_RUN) == "serve run config.yaml"
    assert serve_run_command(CMDLINES[12]) == "serve run config.gpu.yaml"
    for other in (CMDLINES[11], CMDLINES[13], ["serve", "status"], ["serve"], ["python", "my_serve", "run"], []):
        assert serve_run_command(other) is None, other


def test_only_live_serve_run_drivers_on_this_machine_other_than_this_process():
    jobs = [JobRow(pid=10, ip="10.0.0.1", dead=False),
            JobRow(pid=11, ip="10.0.0.1", dead=False),  # not serve run
            JobRow(pid=12, ip="10.0.0.2", dead=False),  # another machine: its pid means nothing here
            JobRow(pid=12, ip="10.0.0.1", dead=True),  # ended
            JobRow(pid=13, ip="10.0.0.1", dead=False),
            JobRow(pid=99, ip="10.0.0.1", dead=False),  # no such process here any more
            JobRow(pid=10, ip="127.0.0.1", dead=False)]  # one process, named by two addresses
    drivers = pick_drivers(jobs, {"10.0.0.1", "127.0.0.1"}, own_pid=50, cmdline_of=CMDLINES.get)
    assert [(d.pid, d.command) for d in drivers] == [(10, "serve run config.yaml")]
    assert pick_drivers(jobs, {"10.0.0.1"}, own_pid=10, cmdline_of=CMDLINES.get) == []


DRIVER = """
import signal, subprocess, sys, time
if sys.argv[1] == "stuck":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a driver stuck in its exit
# its "local Ray": a child that outlives it unless someone ends it
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(300)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["exits", "stuck"])
def test_a_driver_and_its_process_tree_end_whether_or_not_it_exits_on_sigterm(how):
    import subprocess
    import sys

    import psutil

    from deployments.reaper import alive
    from deployments.stop import Driver, end_drivers

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, how], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(driver.stdout.readline()))
    try:
        (ended,) = end_drivers([Driver(pid=driver.pid, command="serve run x")], timeout_s=2, grace_s=1)
        assert ended.pid == driver.pid and ended.killed == (how == "stuck") and ended.left == []
        assert driver.wait(timeout=10) is not None and not alive(child)
    finally:
        driver.kill()
        driver.wait()
        if alive(child):
            child.kill()


def test_a_driver_that_exited_but_was_not_collected_by_its_parent_counts_as_ended():
    """`serve run` under a shell or a test harness that has not waited for it yet: a zombie."""
    import subprocess
    import sys
    import time

    import psutil

    from deployments.reaper import alive
    from deployments.stop import Driver, end_drivers

    parent_code = ("import subprocess, sys, time\n"
                   f"d = subprocess.Popen([sys.executable, '-c', {DRIVER!r}, 'exits'], stdout=subprocess.PIPE, text=True)\n"
                   "print(d.pid, d.stdout.readline().strip(), flush=True)\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    driver, child = map(int, parent.stdout.readline().split())
    try:
        started = time.monotonic()
        (ended,) = end_drivers([Driver(pid=driver, command="serve run x")], timeout_s=20, grace_s=1)
        assert time.monotonic() - started < 15 and not ended.killed and ended.left == []
        assert psutil.Process(driver).status() == psutil.STATUS_ZOMBIE  # its parent never collected it
        assert not alive(psutil.Process(child)) if psutil.pid_exists(child) else True
    finally:
        parent.kill()
        parent.wait()
        if psutil.pid_exists(child) and alive(psutil.Process(child)):
            psutil.Process(child).kill()
