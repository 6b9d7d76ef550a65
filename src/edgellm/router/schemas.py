"""OpenAI's API as the router speaks it: the request bodies it accepts and the error body.

Requests become an `InferenceRequestSpec`, so the router's scheduler sees exactly what an
InferenceRequest would say, and the worker body the router sends on. Unknown fields pass, as in
vLLM's server: clients of newer API versions send fields this router does not know. Features
EdgeLLM cannot honour (several choices, log probabilities, tools) are refused with a 400 naming
the parameter, never silently ignored.
"""

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgellm.api import ChatMessage, InferenceRequestSpec, SamplingParams
from edgellm.api.inferencerequest import Disaggregation, Placement


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape, which the `openai` client raises as its typed errors."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_OpenAIModel):
    type: Literal["text"]
    text: str


class Message(_OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_OpenAIModel):
    include_usage: bool = False


class _Generation(_OpenAIModel):
    """What chat and plain completions share."""

    model: str = Field(min_length=1, max_length=253)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)  # vLLM's extension
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM's extension, for benchmarks
    disaggregation: Disaggregation = "auto"  # EdgeLLM's: split prefill and decode over peers
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> "_Generation":
        if self.n not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per choice")
        if self.logprobs:
            raise ValueError("log probabilities are not supported")
        return self

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        given = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "ignore_eos": self.ignore_eos,
        }
        return SamplingParams.model_validate({k: v for k, v in given.items() if v is not None})

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _no_tools(self) -> "ChatCompletionRequest":
        if self.tools:
            raise ValueError("tool calls are not supported")
        return self

    def spec(self) -> InferenceRequestSpec:
        # OpenAI's newer "developer" role is the system prompt of models without one.
        messages = [
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
            for m in self.messages
        ]
        return InferenceRequestSpec(
            model=self.model,
            messages=messages,
            sampling=self.sampling(self.max_completion_tokens or self.max_tokens),
            placement=Placement(disaggregation=self.disaggregation),
        )


class CompletionRequest(_Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("send one prompt per request")
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def spec(self) -> InferenceRequestSpec:
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return InferenceRequestSpec(
            model=self.model,
            prompt=prompt,
            sampling=self.sampling(self.max_tokens),
            placement=Placement(disaggregation=self.disaggregation),
        )
