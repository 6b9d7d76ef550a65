"""The worker's HTTP API as pydantic models: OpenAI's, vLLM's additions, EdgeLLM's extensions.

A worker is an OpenAI-compatible server, so any OpenAI client, router or load tester talks to
it, and a stock `vllm serve` (or `llama-server`) can stand where an EdgeLLM worker stands:

| endpoint | from | what |
|---|---|---|
| `POST /v1/completions` | OpenAI | `CompletionRequest` -> `Answer`, or `Chunk` events |
| `POST /v1/chat/completions` | OpenAI | `ChatCompletionRequest` -> `Answer`, or `Chunk` events |
| `GET /v1/models` | OpenAI | `ModelList`, each card with vLLM's `max_model_len` |
| `POST /tokenize` | vLLM | `TokenizeRequest` -> `TokenizeResponse` |
| `GET /health` | vLLM | 200 while it serves |
| `DELETE /v1/requests/{request_id}` | EdgeLLM | stops a generation at its next token |
| `POST /v1/prefill` | EdgeLLM | a completion or chat body -> `PrefillResponse` |
| `GET /v1/kv/{request_id}` | EdgeLLM | the KV state that prefill kept, once |
| `GET /v1/kv/ipfs/{block_hash}` | EdgeLLM | the signed announcement of a prefix's KV in IPFS |
| `GET /healthz`, `GET /metrics` | EdgeLLM | the peer's load; Prometheus metrics |

vLLM's own additions are used as vLLM spells them: `top_k`, `ignore_eos`, `request_id` (which
also names the generation for cancelling), `stream_options.continuous_usage_stats` (the token
count on every chunk, from which a resumed request knows its budget), chat's
`continue_final_message` (how a request resumed on another worker goes on after the text
already generated), and `kv_transfer_params`. EdgeLLM's extensions are extra fields, as vLLM
adds `kv_transfer_params`: `kv_from` and `split` on requests, `kv_transfer` on the last chunk
and whole answers, `lost_stages` on errors. Errors are OpenAI's body.

Unknown fields are kept aside and ignored, as vLLM's server does (`model_extra`; the worker logs
them): routers made for vLLM send fields of their own (vllm-router's `no_stop_trim`), and clients
of newer servers read fields they do not know. What EdgeLLM cannot honour (several choices, log
probabilities, tools, echo) is refused by name, never ignored.

Callers: the worker's server (`edgellm.worker.server`), the `WorkerClient`, the attempt loop,
and the router, which answers its own clients in these shapes.
"""

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse

from edgellm.api import ChatMessage, SamplingParams

WireFinishReason = Literal["stop", "length", "abort"]
"""How a worker says a generation ended: vLLM's words ("abort": cancelled)."""

DONE: Final = "data: [DONE]\n\n"
MAX_STAGES: Final = 15  # GGML_RPC_MAX_SERVERS is 16 devices; one stays for growth
STAGE_ENDPOINT_PATTERN: Final = r"^[A-Za-z0-9.-]+:[0-9]{1,5}$"


def sse(event: BaseModel | dict[str, Any]) -> str:
    """One server-sent event of a stream; a model with the fields it was given."""
    if isinstance(event, BaseModel):
        return f"data: {event.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(event)}\n\n"


class _Request(BaseModel):
    """What a worker accepts: unknown fields are kept aside (`model_extra`) and ignored."""

    model_config = ConfigDict(extra="allow")


class _Response(BaseModel):
    """What a client reads: unknown fields are ignored, as newer servers send more."""

    model_config = ConfigDict(extra="ignore")


# --- requests ------------------------------------------------------------------------------


class TextPart(_Response):
    type: Literal["text"]
    text: str


class Message(_Response):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def chat_message(self) -> ChatMessage:
        """As an InferenceRequest's message; OpenAI's newer "developer" is the system prompt of
        models without one."""
        return ChatMessage(
            role="system" if self.role == "developer" else self.role, content=self.text()
        )


class StreamOptions(_Response):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: usage on every chunk, not only after the last."""


class RemoteStage(_Request):
    endpoint: str = Field(pattern=STAGE_ENDPOINT_PATTERN, max_length=260)
    """host:port of the peer's llama.cpp RPC server."""
    layers: int = Field(ge=1, le=4096)
    """The consecutive layers it holds, after the previous stage's."""


class SplitPlan(_Request):
    """How a generation's model is split: the leading peer's first layers, then each stage's
    (EdgeLLM's extension, for a worker started with --split)."""

    context: int = Field(ge=16, le=1 << 20)
    """Tokens of context the split is loaded with; its KV cache is on the layers' peers."""
    leader_layers: int = Field(ge=1, le=4096)
    """The first layers, which the leading peer keeps."""
    stages: list[RemoteStage] = Field(min_length=1, max_length=MAX_STAGES)


class _Generation(_Request):
    """What completions and chat completions share."""

    model: str = Field(min_length=1, max_length=253)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)  # vLLM's
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM's, for benchmarks
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    request_id: str | None = Field(default=None, min_length=1, max_length=253)
    """vLLM's name of the request; EdgeLLM's workers also stop a generation by it."""
    kv_transfer_params: dict[str, Any] | None = None
    """vLLM's: what its KV connector (LMCache) moves for a disaggregated request."""
    kv_from: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    """EdgeLLM's: the `/v1/kv/{id}` URL of the worker that prefilled this prompt, or a peer's
    `/v1/kv/ipfs/{block_hash}` announcement of a prefix's KV in IPFS: that KV is loaded rather
    than computed (llama.cpp workers of the same model only)."""
    split: SplitPlan | None = None
    """EdgeLLM's: for a worker that leads a split model, the peers and layers to run it on."""

    @model_validator(mode="after")
    def _supported(self) -> Self:
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

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("send one prompt per request")
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    @property
    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    add_generation_prompt: bool = True  # vLLM's
    continue_final_message: bool = False
    """vLLM's: the last message is the assistant's unfinished answer, to go on from."""

    @model_validator(mode="after")
    def _chat_supported(self) -> Self:
        if self.tools:
            raise ValueError("tool calls are not supported")
        if self.continue_final_message and (
            self.add_generation_prompt or self.messages[-1].role != "assistant"
        ):
            raise ValueError(
                "continue_final_message goes on from a last assistant message, without"
                " add_generation_prompt"
            )
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


GenerationRequest = CompletionRequest | ChatCompletionRequest


class TokenizeCompletionRequest(_Response):
    """vLLM's `/tokenize` of a prompt; its other options are ignored: a worker answers with the
    tokens it computes the prompt as."""

    model: str | None = None
    prompt: str


class TokenizeChatRequest(_Response):
    """vLLM's `/tokenize` of a chat, through the model's chat template."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=1024)
    add_generation_prompt: bool = True


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


# --- answers -------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "Usage":
        details = PromptTokensDetails(cached_tokens=cached)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=details,
        )

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens_details.cached_tokens if self.prompt_tokens_details else 0


class KVTransfer(_Response):
    """EdgeLLM's: the KV a worker loaded for `kv_from` rather than computed."""

    bytes: int
    seconds: float
    tokens: int
    source: Literal["peer", "ipfs"]
    manifest: str | None = None
    """The IPFS manifest the KV came from."""


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    """A choice of either kind of chunk: completions carry `text`, chat completions `delta`."""

    index: int = 0
    text: str | None = None
    delta: Delta | None = None
    logprobs: None = None
    finish_reason: str | None = None

    @property
    def content(self) -> str:
        if self.delta is not None:
            return self.delta.content or ""
        return self.text or ""


class Chunk(_Response):
    """One event of a streamed completion or chat completion."""

    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    kv_transfer: KVTransfer | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Response):
    index: int = 0
    text: str | None = None
    message: AssistantMessage | None = None
    logprobs: None = None
    finish_reason: str | None = None


class Answer(_Response):
    """A whole completion or chat completion."""

    id: str
    object: Literal["text_completion", "chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    kv_transfer: KVTransfer | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgellm"
    max_model_len: int | None = None  # vLLM's


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class PrefillResponse(_Response):
    """EdgeLLM's: a prompt's KV computed and kept for `GET /v1/kv/{id}`."""

    id: str
    prompt_tokens: int
    cached_tokens: int
    prefill_seconds: float
    state_bytes: int


class ErrorDetail(_Response):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None
    lost_stages: list[str] | None = None
    """EdgeLLM's, on a split's failure: the RPC endpoints of the stages that stopped answering
    (empty: the leading peer's own failure)."""


class ErrorResponse(_Response):
    error: ErrorDetail


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    lost_stages: list[str] | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape, which the `openai` client raises as its typed errors."""
    detail = ErrorDetail(message=message, type=kind, param=param, code=code)
    if lost_stages is not None:
        detail.lost_stages = lost_stages
    body = ErrorResponse(error=detail).model_dump(exclude_unset=True)
    return JSONResponse(body, status_code=status, headers=headers)


def invalid_request(errors: Sequence[Mapping[str, Any]], skip: int = 0) -> JSONResponse:
    """A 400 for a body that failed validation, naming the first field at fault (`skip`: the
    leading parts of its location that are not fields, such as FastAPI's "body")."""
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"][skip:]) or None
    message = str(first["msg"]).removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param)


class Answering:
    """One generation's answer in OpenAI's shapes: whole, or as stream chunks. The worker
    answers its callers so, and the router its clients."""

    def __init__(self, *, chat: bool, request_id: str, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._role_sent = False

    def chunk(self, text: str, usage: Usage | None = None) -> Chunk:
        """A chunk of text; with `usage`, the counts so far (vLLM's continuous usage)."""
        return self._chunk([self._chunk_choice(text, None)], usage)

    def last(
        self, finish_reason: str, usage: Usage, kv_transfer: KVTransfer | None = None
    ) -> list[Chunk]:
        """The chunk that finishes the choice, then the usage chunk when it was asked for;
        the KV loaded for `kv_from` on the last of them."""
        chunks = [self._chunk([self._chunk_choice("", finish_reason)], None)]
        if self.include_usage:
            chunks.append(self._chunk([], usage))
        if kv_transfer is not None:
            chunks[-1].kv_transfer = kv_transfer
        return chunks

    def whole(
        self, text: str, finish_reason: str, usage: Usage, kv_transfer: KVTransfer | None = None
    ) -> Answer:
        choice = (
            Choice(
                message=AssistantMessage(role="assistant", content=text),
                logprobs=None,
                finish_reason=finish_reason,
            )
            if self.chat
            else Choice(text=text, logprobs=None, finish_reason=finish_reason)
        )
        kind: Literal["text_completion", "chat.completion"] = (
            "chat.completion" if self.chat else "text_completion"
        )
        answer = Answer(
            id=self.id,
            object=kind,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage,
        )
        if kv_transfer is not None:
            answer.kv_transfer = kv_transfer
        return answer

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None) -> Chunk:
        kind: Literal["text_completion", "chat.completion.chunk"] = (
            "chat.completion.chunk" if self.chat else "text_completion"
        )
        chunk = Chunk(
            id=self.id, object=kind, created=self.created, model=self.model, choices=choices
        )
        if usage is not None:
            chunk.usage = usage
        return chunk

    def _chunk_choice(self, text: str, finish_reason: str | None) -> ChunkChoice:
        if not self.chat:
            return ChunkChoice(index=0, text=text, logprobs=None, finish_reason=finish_reason)
        delta = Delta(content=text) if text or finish_reason is None else Delta()
        if not self._role_sent:
            delta.role = "assistant"
            self._role_sent = True
        return ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)
