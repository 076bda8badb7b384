"""The packed app on a real GPU with real Ray Serve: two `num_gpus: 0.5` replicas of one model
with CUDA graphs on, started one after another on the same device, both answering, each with the
planned KV pool held on the device. Runs only where
CUDA vLLM and a GPU are present (the skip never initialises CUDA in this process)."""

from __future__ import annotations

import openai
import pytest

from bench.own_cluster import free_port, own_local_ray
from tests.engine_build import cuda_engine_missing
from tests.ray.conftest import replica_infos

MISSING = cuda_engine_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

HTTP_PORT = free_port()  # never a user's 8000
MODEL = "smollm2-135m"
KV_BYTES = 512 << 20
SMOLLM2_BF16_KV_PER_TOKEN = 30 * 2 * 3 * 64 * 2


@pytest.fixture(scope="module")
def app(smollm2_path):
    from ray import serve

    with own_local_ray(num_gpus=1):  # its own temp dir and ports
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        try:
            yield _deploy(serve, smollm2_path)
        finally:
            serve.shutdown()


def _deploy(serve, smollm2_path):
    from deployments.app import build
    from deployments.cluster_view import ClusterView
    from deployments.config import parse_args
    from deployments.engine import replica_deployment_name

    args = parse_args({
        "device": "cuda",
        "models": [{"model": str(smollm2_path), "name": MODEL, "replicas_per_device": 2, "max_num_seqs": 32,
                    "kv_cache_bytes": f"{KV_BYTES >> 20}MiB", "max_model_len": 2048, "dtype": "bfloat16",
                    "enforce_eager": False}],
    })
    assert args.models[0].enforce_eager is False  # CUDA graphs, as served by default
    serve.run(build(args, ClusterView.from_ray()), name="plateau-gpu", route_prefix="/")
    return serve.get_deployment_handle(replica_deployment_name(MODEL, 2), app_name="plateau-gpu")


def test_two_half_gpu_replicas_with_cuda_graphs_share_the_gpu(app):
    import ray

    from advisor.nvml import cuda_device

    infos = replica_infos(app)
    assert len(infos) == 2
    assert ray.available_resources().get("GPU", 0.0) == 0.0  # 2 x num_gpus 0.5 on the one GPU
    for info in infos.values():
        assert info.device_kind == "cuda"
        assert info.num_kv_blocks * info.kv_block_tokens == pytest.approx(KV_BYTES / SMOLLM2_BF16_KV_PER_TOKEN,
                                                                          rel=0.05)
    # Ray gave this driver's cuda:0 (GPU 0) to both replicas: both KV pools are held there.
    assert cuda_device("cuda").memory_used() >= 2 * KV_BYTES


def test_both_replicas_answer(app):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="none", max_retries=0, timeout=120)
    for _ in range(4):  # the router spreads them over both replicas
        out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert out.choices[0].text.strip()
