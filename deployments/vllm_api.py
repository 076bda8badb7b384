"""vLLM's own OpenAI server, reused: its FastAPI app over a replica's engine, and its OpenAPI schema.

A replica answers OpenAI requests with exactly the code `vllm serve` runs (request models,
validation, sampling defaults, chat templates, structured outputs, tools, logprobs, error bodies,
SSE), built here over the replica's `AsyncLLM` the way Ray Serve LLM does
(`ray/llm/_internal/serve/engines/vllm/vllm_engine.py`). The ingress publishes vLLM's OpenAPI
document for the endpoints it serves, generated from the same app without an engine.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

from deployments.engine import server_args
from deployments.spec import ReplicaSpec

if TYPE_CHECKING:
    from fastapi import FastAPI
    from vllm.v1.engine.async_llm import AsyncLLM

# What the ingress serves; each path is answered by vLLM's handler of the same path.
FORWARDED_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
INGRESS_PATHS = ("/health", "/version", "/v1/models")


async def build_openai_app(engine: "AsyncLLM", spec: ReplicaSpec) -> "FastAPI":
    """vLLM's OpenAI FastAPI app serving `engine` under the replica's served name."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    args = server_args(spec)
    tasks = await engine.get_supported_tasks()
    state = State()
    await init_app_state(engine, state, args, supported_tasks=tasks)
    app = build_app(args, supported_tasks=tasks, model_config=engine.model_config)
    app.state._state.update(state._state)
    # vLLM's engine-error handler flips `state.server.should_exit` (its uvicorn server). There is
    # no uvicorn here: Serve replaces the replica through its health check instead.
    app.state.server = types.SimpleNamespace()
    return app


def openai_schema(spec: ReplicaSpec) -> dict:
    """vLLM's OpenAPI document, cut to the paths the ingress serves (no engine needed)."""
    from vllm.entrypoints.launchers.app import build_app

    doc = build_app(server_args(spec), supported_tasks=("generate",)).openapi()
    keep = set(FORWARDED_PATHS) | set(INGRESS_PATHS)
    doc["paths"] = {p: ops for p, ops in doc["paths"].items() if p in keep}
    doc["info"] = {"title": "plateau-serve (vLLM OpenAI API)", "version": doc.get("info", {}).get("version", "")}
    return doc
