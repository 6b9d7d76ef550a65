"""`InferenceRequest`: one generation asked of the federation, and its result.

Namespaced. A user (`kubectl apply`) or the router writes the spec, which is immutable; the
operator schedules it, runs it on workers and writes the status, output included.
"""

from datetime import datetime
from typing import Literal, Self

from pydantic import ConfigDict, Field, model_validator

from edgellm.api._common import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    ClusterName,
    Condition,
    LabelSelector,
    Model,
    ModelName,
    ObjectMeta,
    PeerName,
    TrustLevel,
    cel,
    conditions_field,
)

Phase = Literal["Pending", "Scheduled", "Running", "Succeeded", "Failed", "Cancelled"]
TERMINAL_PHASES: frozenset[Phase] = frozenset({"Succeeded", "Failed", "Cancelled"})
MessageRole = Literal["system", "user", "assistant", "tool"]
Disaggregation = Literal["auto", "always", "never"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
CacheSource = Literal["none", "local", "peer", "ipfs"]

EXACTLY_ONE_PROMPT = "exactly one of prompt, messages or promptFrom must be set"


class ChatMessage(Model):
    """One turn of a chat, as in OpenAI's chat completions API."""

    role: MessageRole
    """Who speaks: system, user, assistant or tool."""
    content: str = Field(max_length=1_000_000)
    """What they say."""


class KeyRef(Model):
    """A key of a Secret or ConfigMap in the request's namespace."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """The object's name."""
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)
    """The key whose value is the prompt."""


class PromptSource(Model):
    """Where to read a prompt kept out of the request itself, for privacy or size."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                    "exactly one of secretKeyRef or configMapKeyRef must be set",
                )
            ]
        }
    )

    secret_key_ref: KeyRef | None = None
    """Read the prompt from this key of a Secret."""
    config_map_key_ref: KeyRef | None = None
    """Read the prompt from this key of a ConfigMap."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("exactly one of secretKeyRef or configMapKeyRef must be set")
        return self


class SamplingParams(Model):
    """How tokens are drawn, with OpenAI's meanings and defaults."""

    max_tokens: int = Field(default=128, ge=1, le=131072)
    """The most tokens to generate."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Randomness: 0 always takes the likeliest token."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches this."""
    top_k: int = Field(default=0, ge=0, le=1000)
    """Draw from the k likeliest tokens only; 0 turns it off."""
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    """Seed of the random draws, for repeatable output."""
    stop: list[str] = Field(default_factory=list, max_length=4)
    """Generation stops before any of these strings."""
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    """Penalises tokens that already appeared."""
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    """Penalises tokens by how often they already appeared."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token, up to maxTokens (as vLLM's ignore_eos;
    for benchmarks and tests that need a known length)."""


class Session(Model):
    """Requests naming one session keep their workers and KV cache warm between turns."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    """The session's name, shared by its requests."""
    idle_ttl_seconds: int = Field(default=300, alias="idleTTLSeconds", ge=1, le=86400)
    """How long the session's workers stay warm after its last request."""


class Placement(Model):
    """Constraints on where the request runs."""

    disaggregation: Disaggregation = "auto"
    """Split prefill and decode over two peers: auto (only when moving the KV cache is faster
    than recomputing it), always or never."""
    peer_selector: LabelSelector | None = None
    """Only peers whose labels match."""
    min_trust: TrustLevel = "community"
    """Only peers at least this trusted: untrusted, community or trusted."""
    clusters: list[ClusterName] = Field(
        default_factory=list, max_length=64, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Only peers of these member clusters; empty for any."""


class InferenceRequestSpec(Model):
    """The generation asked for. Immutable: create a new request to ask again."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.prompt), has(self.messages), has(self.promptFrom)]"
                    ".filter(x, x).size() == 1",
                    EXACTLY_ONE_PROMPT,
                ),
                cel("self == oldSelf", "spec is immutable: create a new InferenceRequest"),
            ]
        }
    )

    model: ModelName = Field(min_length=1, max_length=253)
    """The model to run, by the name peers list in spec.models."""
    prompt: str | None = Field(default=None, min_length=1, max_length=1_000_000)
    """A plain-text prompt to complete."""
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    """A chat to continue."""
    prompt_from: PromptSource | None = None
    """A prompt kept in a Secret or ConfigMap."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    """How tokens are drawn."""
    session: Session | None = None
    """Keep workers and KV cache warm for the next request of the same session."""
    placement: Placement = Field(default_factory=Placement)
    """Constraints on where the request runs."""
    timeout_seconds: int = Field(default=600, ge=1, le=86400)
    """The request fails if it has not finished this long after creation."""

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> Self:
        given = [self.prompt is not None, self.messages is not None, self.prompt_from is not None]
        if sum(given) != 1:
            raise ValueError(EXACTLY_ONE_PROMPT)
        return self


class Stage(Model):
    """One peer's part of a model split across peers: a run of consecutive layers."""

    peer: PeerName
    """The peer that holds and computes these layers."""
    first_layer: int = Field(ge=0)
    """The first of its layers, counted from the input."""
    last_layer: int = Field(ge=0)
    """The last of its layers (inclusive)."""


class Assignment(Model):
    """Where the request runs."""

    prefill_peer: PeerName | None = None
    """The peer that computes the prompt's KV cache."""
    decode_peer: PeerName | None = None
    """The peer that generates; the same as prefillPeer unless disaggregated."""
    cluster: ClusterName | None = None
    """The member cluster of the decode peer."""
    disaggregated: bool = False
    """Whether prefill and decode run on different peers."""
    attempts: int = Field(default=0, ge=0)
    """How many times the request was started; more than 1 after a peer was lost."""
    stages: list[Stage] = Field(default_factory=list, max_length=64)
    """For a model too large for any one peer: the peers it is split across, in the order its
    layers run, the decode peer first (it leads: it holds the weights and samples); empty
    when one peer holds the whole model."""


class CacheStats(Model):
    """How much of the prompt came from a KV cache."""

    prompt_tokens: int = Field(default=0, ge=0)
    """Tokens in the prompt."""
    cached_tokens: int = Field(default=0, ge=0)
    """Prompt tokens whose KV was reused rather than computed."""
    source: CacheSource = "none"
    """Where the reused KV came from: none, local, peer or ipfs."""


class Timings(Model):
    """How long each part took, in seconds."""

    queue_seconds: float | None = Field(default=None, ge=0)
    """From creation to the start on a worker."""
    ttft_seconds: float | None = Field(default=None, ge=0)
    """From creation to the first generated token."""
    total_seconds: float | None = Field(default=None, ge=0)
    """From creation to the end."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Generated tokens per second of decoding."""


class ConfigMapRef(Model):
    """A ConfigMap in the request's namespace."""

    name: str = Field(max_length=253)
    """The ConfigMap's name."""
    key: str = Field(max_length=253)
    """The key that holds the text."""


class Output(Model):
    """What the model generated."""

    text: str | None = None
    """The generated text; absent when it was too large and went to configMapRef."""
    config_map_ref: ConfigMapRef | None = None
    """Where a large output was written instead of text."""
    finish_reason: FinishReason | None = None
    """Why generation stopped: stop, length, cancelled or error."""
    prompt_tokens: int = Field(default=0, ge=0)
    """Tokens in the prompt."""
    completion_tokens: int = Field(default=0, ge=0)
    """Tokens generated."""


class InferenceRequestStatus(Model):
    """What happened to the request."""

    phase: Phase = "Pending"
    """Pending, Scheduled, Running, Succeeded, Failed or Cancelled."""
    conditions: list[Condition] = conditions_field(
        "Scheduled (peers chosen), Running (a worker is generating), Complete (finished; reason"
        " says how)."
    )
    assignment: Assignment = Field(default_factory=Assignment)
    """Where the request runs."""
    cache: CacheStats = Field(default_factory=CacheStats)
    """How much of the prompt came from a KV cache."""
    timings: Timings = Field(default_factory=Timings)
    """How long each part took."""
    output: Output | None = None
    """What the model generated: while Running, the text and tokens so far (a request resumed
    on another peer goes on from them); once finished, the whole."""
    start_time: datetime | None = None
    """When a worker started the request."""
    completion_time: datetime | None = None
    """When the request reached a final phase."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status was computed from."""


class InferenceRequest(Model):
    """A generation asked of the federation, and its result."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["edgellm.io/v1alpha1"] = API_VERSION
    kind: Literal["InferenceRequest"] = "InferenceRequest"
    metadata: ObjectMeta
    spec: InferenceRequestSpec
    status: InferenceRequestStatus = Field(default_factory=InferenceRequestStatus)
