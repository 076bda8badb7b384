"""OpenAI wire format: request schemas (validated), response bodies and error bodies.

Only the pieces plateau-serve answers: completions and chat completions, plain and SSE.
Unknown request fields are ignored (clients send many optional ones); known fields are checked
with the same limits as OpenAI and vLLM's own server.
"""

from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.protocol import ChatMessage, GenerateChunk, GenerateRequest, GenerateResult


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="Served model name (see GET /v1/models).")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS.")
    stream_options: Optional[dict[str, bool]] = None

    def _common(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            n=self.n,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]] = Field(description="Text, token ids, or a one-item list of text.")
    max_tokens: Optional[int] = Field(16, ge=1)

    def to_generate(self, request_id: str) -> GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("prompt: send one prompt per request (a string, token ids, or a one-item list)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return GenerateRequest(request_id=request_id, prompt=prompt, max_tokens=self.max_tokens, **self._common())
        return GenerateRequest(request_id=request_id, prompt_token_ids=list(prompt), max_tokens=self.max_tokens, **self._common())


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[_TextPart]]

    def plain(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role=self.role, content=text)


class ChatRequest(_Sampling):
    messages: list[_ChatMessageIn] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def to_generate(self, request_id: str) -> GenerateRequest:
        cap = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return GenerateRequest(
            request_id=request_id, messages=[m.plain() for m in self.messages], max_tokens=cap, **self._common()
        )


# ---- errors ----------------------------------------------------------------------------------
def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[Union[int, str]] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(exc: ValidationError) -> dict:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
    return error_body(details, "invalid_request_error", param=param or None, code=400)


# ---- responses -------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, result: GenerateResult, chat: bool) -> dict:
    completion_tokens = sum(c.completion_tokens for c in result.choices)
    if chat:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None} for c in result.choices]
    else:
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for c in result.choices]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(result.prompt_tokens, completion_tokens)}


def chunk_body(rid: str, model: str, chunk: GenerateChunk, chat: bool, first: bool) -> dict:
    if chat:
        delta: dict = {"content": chunk.text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": chunk.index, "delta": delta, "finish_reason": chunk.finish_reason, "logprobs": None}
    else:
        choice = {"index": chunk.index, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk_body(rid: str, model: str, prompt_tokens: int, completion_tokens: int, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens)}
