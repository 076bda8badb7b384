import json

import pytest

from bench.path_cost import NAME, TINY, plateau_model, tiny_model_folder
from deployments.config import parse_args


def test_the_tiny_model_is_the_source_config_cut_to_the_tiny_shape_with_its_tokenizer_and_no_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                                                 "num_hidden_layers": 30, "eos_token_id": 2}))
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "model.safetensors").write_bytes(b"weights")
    dst = tiny_model_folder(src, tmp_path / "tiny")
    config = json.loads((dst / "config.json").read_text())
    assert config == {"model_type": "llama", "vocab_size": 49152, "eos_token_id": 2, **TINY}
    assert (dst / "tokenizer.json").read_text() == '{"model": {}}'
    assert not (dst / "model.safetensors").exists()


def test_the_plateau_side_is_a_valid_config_entry_with_random_weights_at_a_fixed_n(tmp_path):
    args = parse_args({"models": [plateau_model(tmp_path, 2, "float32")]})
    m = args.models[0]
    assert (m.name, m.replicas_per_device, m.engine_kwargs["load_format"]) == (NAME, 2, "dummy")


class _FakeSide:
    def __init__(self, name, log):
        self.name, self.log, self.stopped = name, log, False

    def stop(self):
        self.stopped = True


def test_each_side_is_measured_and_stopped_and_one_failing_keeps_the_others_numbers(tmp_path):
    from bench.vs_vllm import run_sides

    started = {}

    def start(name):
        if name == "broken":
            raise RuntimeError("cluster did not start")
        started[name] = _FakeSide(name, tmp_path / f"{name}.log")
        return started[name]

    def measure(side):
        if side.name == "flaky":
            raise RuntimeError("client failed")
        return [side.name]

    results, failed = run_sides(["a", "broken", "flaky", "b"], start, measure)
    assert results == {"a": ["a"], "b": ["b"]}
    assert failed == {"broken": "RuntimeError: cluster did not start", "flaky": "RuntimeError: client failed"}
    assert all(s.stopped for s in started.values()) and set(started) == {"a", "flaky", "b"}


def test_a_variant_names_its_variables_and_a_malformed_one_says_what_is_expected():
    import pytest

    from bench.vs_vllm import parse_variant

    assert parse_variant("tput:RAY_SERVE_THROUGHPUT_OPTIMIZED=1,X=a=b") == (
        "tput", {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "X": "a=b"})
    for bad in ("tput", ":A=1", "tput:", "tput:A=1,B"):
        with pytest.raises(SystemExit, match="expected NAME:K=V"):
            parse_variant(bad)


def test_variant_sides_run_right_after_the_start_they_vary():
    import pytest

    from bench.vs_vllm import with_variants

    assert with_variants(["vllm", "plateau", "plateau-reuse"], ["plateau-reuse-before"]) == [
        "vllm", "plateau", "plateau-reuse", "plateau-reuse-before"]
    assert with_variants(["plateau-reuse", "vllm"], ["plateau-reuse-a", "plateau-reuse-b"]) == [
        "plateau-reuse", "plateau-reuse-a", "plateau-reuse-b", "vllm"]
    assert with_variants(["vllm", "plateau"], []) == ["vllm", "plateau"]
    with pytest.raises(SystemExit, match="keep plateau-reuse in --sides"):
        with_variants(["vllm", "plateau"], ["plateau-reuse-before"])


def test_each_side_is_compared_with_each_vllm_side_point_by_point():
    from bench.vs_vllm import ratios

    def row(tok, ttft, itl=None, failed=0):
        return {"concurrency": 16, "prompt_tokens": 128, "output_tokens_per_s": tok, "ttft_p99_ms": ttft,
                "itl_p50_ms": itl, "failed": failed}

    got = ratios({"vllm": [row(100.0, 200.0, 20.0)], "vllm-tuned": [row(120.0, 150.0, 10.0, failed=2)],
                  "plateau": [row(150.0, 100.0, 20.0, failed=1)]})
    assert got == {"plateau": [{"concurrency": 16, "prompt_tokens": 128, "failed": 1, "against": {
        "vllm": {"tokens_per_s_ratio": 1.5, "ttft_p99_ratio": 0.5, "itl_p50_ratio": 1.0, "failed": 0},
        "vllm-tuned": {"tokens_per_s_ratio": 1.25, "ttft_p99_ratio": 0.667, "itl_p50_ratio": 2.0, "failed": 2}}}]}
    assert ratios({"plateau": [row(150.0, 100.0)]}) == {}
    # vLLM's client gives no ITL for a side where it failed: the ratio says so instead of failing
    assert ratios({"vllm": [row(100.0, 200.0)], "p": [row(50.0, 100.0)]})["p"][0]["against"]["vllm"]["itl_p50_ratio"] \
        is None


def test_the_one_core_side_sets_up_vllms_engine_as_the_first_replica_of_two_on_this_node():
    import os

    from bench.vs_vllm import Shipped, one_core_setup
    from deployments.engine import cpu_cores_for

    env, extra = one_core_setup(Shipped(cfg={}, name="m", folder="/models/m"))
    half = cpu_cores_for(0, 2, sorted(os.sched_getaffinity(0)))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, half))
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert extra[extra.index("--max-num-seqs") + 1] == "64" and "--disable-log-stats" in extra


def test_rounds_alternate_the_order_and_each_point_is_the_rounds_mean():
    from bench.vs_vllm import merge_rounds, round_orders

    assert round_orders(["vllm", "plateau-reuse"], 3) == [["vllm", "plateau-reuse"], ["plateau-reuse", "vllm"],
                                                          ["vllm", "plateau-reuse"]]

    def point(tok, ttft, failed=0):
        return {"concurrency": 1, "prompt_tokens": 128, "requests": 6, "completed": 6 - failed, "failed": failed,
                "output_tokens_per_s": tok, "ttft_p99_ms": ttft}

    merged = merge_rounds([{"vllm": {"ready_s": 40.0, "points": [point(16.0, 400.0)]},
                            "plateau-reuse": {"ready_s": 80.0, "points": [point(12.0, 500.0, failed=1)]}},
                           {"plateau-reuse": {"ready_s": 75.0, "points": [point(15.0, 450.0)]},
                            "vllm": {"ready_s": 41.0, "points": [point(14.0, 420.0)]}}])
    assert merged["vllm"]["points"] == [{**point(15.0, 410.0), "requests": 12, "completed": 12}]
    plateau = merged["plateau-reuse"]
    assert plateau["points"][0]["output_tokens_per_s"] == 13.5 and plateau["points"][0]["failed"] == 1
    assert plateau["ready_s"] == 80.0
    assert [(r["round"], r["ready_s"], r["points"][0]["output_tokens_per_s"]) for r in plateau["rounds"]] == [
        (1, 80.0, 12.0), (2, 75.0, 15.0)]
    # a side that failed in one round is the mean of the rounds it has
    one = merge_rounds([{}, {"vllm": {"ready_s": 40.0, "points": [point(16.0, 400.0)]}}])
    assert one["vllm"]["points"][0]["output_tokens_per_s"] == 16.0
    assert [r["round"] for r in one["vllm"]["rounds"]] == [2]


def test_rounds_refuse_sides_that_would_not_start_alike_in_every_round():
    import pytest

    from bench.vs_vllm import check_rounds

    for sides in (["vllm", "plateau"], ["plateau-before", "vllm"]):
        with pytest.raises(SystemExit, match="first start only"):
            check_rounds(sides, 2, "/home")
    with pytest.raises(SystemExit, match="needs --plateau-home"):
        check_rounds(["vllm", "plateau-reuse"], 2, None)
    with pytest.raises(SystemExit, match="at least 1"):
        check_rounds(["vllm"], 0, None)
    check_rounds(["vllm", "plateau-reuse"], 2, "/home")
    check_rounds(["vllm", "plateau"], 1, None)  # one round: every side as before


def test_a_serve_run_side_is_ready_only_once_serve_reports_every_replica_up(tmp_path, monkeypatch):
    """The first completion comes from the first replica whose engine started; the benchmark waits for
    Serve's RUNNING (the other engines start after it and would take the first point's cores)."""
    import subprocess
    import time

    import httpx

    import bench.vs_vllm as vs

    class Proc:
        def poll(self):
            return None

    class Cluster:
        address = "127.0.0.1:6379"

        def env(self):
            return {"TAG": "cluster"}

    side = object.__new__(vs.ServeRunSide)
    side.name, side.log, side.port, side.proc, side.app = "plateau-reuse", tmp_path / "log", 1, Proc(), "plateau"
    side.cluster, side.started = Cluster(), time.monotonic()
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200))
    runs = []

    def run(cmd, env, timeout, **kwargs):
        runs.append((cmd, env, timeout))
        if returncode is None:
            raise subprocess.TimeoutExpired(cmd, timeout)
        return subprocess.CompletedProcess(cmd, returncode, stderr="application plateau is DEPLOY_FAILED: boom")
    monkeypatch.setattr(vs.subprocess, "run", run)

    returncode = 0
    assert 0 <= side.wait_ready("m", 60) < 60
    (cmd, env, timeout), = runs
    assert cmd[2:5] == [vs.SERVE_APP_RUNNING, "127.0.0.1:6379", "plateau"] and env == {"TAG": "cluster"}
    assert 55 <= int(cmd[5]) <= 60 and timeout > int(cmd[5])  # what is left of the 60 s, and a limit above it
    returncode = 2
    with pytest.raises(RuntimeError, match="did not report 'plateau' RUNNING .*DEPLOY_FAILED: boom"):
        side.wait_ready("m", 60)
    returncode = None
    with pytest.raises(RuntimeError, match="status check itself did not return"):
        side.wait_ready("m", 60)
