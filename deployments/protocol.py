"""What the ingress and a replica exchange (also the Python `DeploymentHandle` API).

A replica's `generate` returns a `GenerateResult`; `generate_stream` yields `GenerateChunk`s.
Either may instead yield/return a `GenerateError` (an HTTP status, an OpenAI error type and a
message): client mistakes and a dead engine are answers, not exceptions across Ray.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(description="Author of the message.")
    content: str = Field(description="Message text.")


class GenerateRequest(BaseModel):
    """One generation: a prompt (text, token ids or chat messages) and sampling settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(description="Unique id; the engine's request id.")
    prompt: Optional[str] = Field(None, description="Completion prompt as text.")
    prompt_token_ids: Optional[list[int]] = Field(None, description="Completion prompt as token ids.")
    messages: Optional[list[ChatMessage]] = Field(None, description="Chat messages; the model's chat template applies.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Output cap; None = fill the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    seed: Optional[int] = Field(None, description="Sampling seed.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI presence penalty.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI frequency penalty.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks, profiling).")

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise ValueError("exactly one of prompt, prompt_token_ids or messages must be set")
        return self


class GenerateChunk(BaseModel):
    """New text of one choice since the previous chunk."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int = Field(description="Choice index (0..n-1).")
    text: str = Field(description="Text added since the last chunk of this choice.")
    finish_reason: Optional[str] = Field(None, description="stop | length | abort, on the last chunk.")
    prompt_tokens: int = Field(description="Tokens in the prompt.")
    completion_tokens: int = Field(description="Tokens generated so far for this choice.")


class Choice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    index: int
    text: str
    finish_reason: Optional[str]
    completion_tokens: int


class GenerateResult(BaseModel):
    """A finished generation."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    choices: list[Choice]
    prompt_tokens: int


class GenerateError(BaseModel):
    """A request that could not be served; `status` is the HTTP status the ingress answers."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    status: int = Field(description="HTTP status: 400 client error, 503 replica unavailable.")
    type: str = Field(description="OpenAI error type, e.g. invalid_request_error.")
    message: str = Field(description="What went wrong and how to fix it.")
    param: Optional[str] = Field(None, description="The request field at fault.")
    retryable: bool = Field(False, description="True when another replica may serve the same request.")


GenerateOutcome = Union[GenerateResult, GenerateError]
StreamItem = Union[GenerateChunk, GenerateError]
