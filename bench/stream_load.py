"""A plain closed-loop streaming client: the second client next to vLLM's benchmark client.

    python bench/stream_load.py --port 8000 --model smollm2-135m --concurrency 32 [--seconds 60]
                                [--warmup-s 15] [--prompt-tokens 128] [--output-tokens 64]

Each of `--concurrency` streams sends `/v1/completions` with `stream: true`, a prompt of
`--prompt-tokens` random token ids (ids from 1000 to 20000: ordinary tokens of every tokenizer the
project ships), exactly `--output-tokens` tokens (`ignore_eos`, temperature 0), and sends the next
one as soon as the last ended: a steady closed loop, no ramp. After `--warmup-s` it measures for
`--seconds`: output tokens/s (tokens that arrived inside the window), requests finished, TTFT and
inter-token gaps (between SSE chunks) of requests that started inside the window, and every
failed request with what it got. The last stdout line is the JSON result. It is one process with
one event loop (aiohttp), so on a 2-core machine it takes less CPU than a client with workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class LoadResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    concurrency: int
    seconds: float = Field(description="Length of the measuring window.")
    output_tokens_per_s: float
    requests_finished: int = Field(description="Requests that ended inside the window.")
    failed: int = Field(description="Requests that failed (any time after the warm-up began).")
    failures: list[str] = Field(description="What the first failed requests got.")
    ttft_p50_ms: Optional[float]
    ttft_p99_ms: Optional[float]
    itl_p50_ms: Optional[float]
    itl_p99_ms: Optional[float]


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run(port: int, model: str, concurrency: int, seconds: float, warmup_s: float, prompt_tokens: int,
              output_tokens: int, host: str = "127.0.0.1", api_key: Optional[str] = None) -> LoadResult:
    import aiohttp

    url = f"http://{host}:{port}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(0)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    window = (begin + warmup_s, begin + warmup_s + seconds)
    token_times: list[float] = []
    ttfts: list[float] = []
    gaps: list[float] = []
    finished: list[float] = []
    failures: list[str] = []

    async def one(session) -> None:
        body = {"model": model, "prompt": [rng.randint(1000, 20000) for _ in range(prompt_tokens)],
                "max_tokens": output_tokens, "min_tokens": output_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True}
        sent = loop.time()
        last = None
        counted = sent >= window[0]
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    failures.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    return
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        failures.append(f"error event: {str(event['error'])[:200]}")
                        return
                    now = loop.time()
                    token_times.append(now)
                    if counted:
                        if last is None:
                            ttfts.append(now - sent)
                        else:
                            gaps.append(now - last)
                    last = now
            finished.append(loop.time())
        except Exception as exc:  # the stream was cut
            failures.append(f"{type(exc).__name__}: {exc}"[:200])

    async def stream_slot(session) -> None:
        while loop.time() < window[1]:
            await one(session)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(stream_slot(session) for _ in range(concurrency)))
    inside = [t for t in token_times if window[0] <= t < window[1]]
    return LoadResult(
        concurrency=concurrency, seconds=seconds, output_tokens_per_s=len(inside) / seconds,
        requests_finished=sum(1 for t in finished if window[0] <= t < window[1]), failed=len(failures),
        failures=failures[:10], ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        itl_p50_ms=_ms(percentile(gaps, 50)), itl_p99_ms=_ms(percentile(gaps, 99)),
    )


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 1)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ns = ap.parse_args(argv)
    result = asyncio.run(run(ns.port, ns.model, ns.concurrency, ns.seconds, ns.warmup_s, ns.prompt_tokens,
                             ns.output_tokens, ns.host))
    print(f"[stream_load] c={result.concurrency}: {result.output_tokens_per_s:.1f} tok/s, TTFT p50/p99 "
          f"{result.ttft_p50_ms}/{result.ttft_p99_ms} ms, ITL p50/p99 {result.itl_p50_ms}/{result.itl_p99_ms} ms, "
          f"failed {result.failed}", file=sys.stderr)
    print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
