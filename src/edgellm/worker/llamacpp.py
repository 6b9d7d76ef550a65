"""The llama.cpp backend: one GGUF model in one llama.cpp context, through llama-cpp-python.

The worker's HTTP layer (`server.py`) calls `generate`, which yields each token as llama.cpp
samples it (counts are exact, stop strings are honoured), so a client sees the first token as
soon as it exists and a cancelled request stops generating at the next token.
llama-cpp-python's `Llama` is not safe across threads and has no continuous batching, so the
caller gives requests turns (the server's `turn`); prompts that share a prefix with the previous
one reuse its KV cache.
"""

import codecs
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from jinja2 import Template  # the engine of chat templates, as in llama.cpp's own server
from llama_cpp import Llama, LogitsProcessorList

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True)
class Piece:
    """One generated token's text; the last piece of a generation carries the finish reason."""

    text: str
    finish_reason: FinishReason | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_seconds: float | None = None


class PromptTooLongError(ValueError):
    """The prompt plus max_tokens does not fit the model's context."""


class LlamaCppBackend:
    def __init__(self, model: Path, context: int = 0, threads: int | None = None) -> None:
        self.model_path = model
        self._llama = Llama(
            model_path=str(model),
            n_ctx=context,  # 0: the model's own context length
            n_threads=threads,
            verbose=False,
        )

    @property
    def context(self) -> int:
        return int(self._llama.n_ctx())

    def tokenize(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=True, special=True))

    async def tokenize_async(self, text: str) -> list[int]:
        # Tokenizing touches only the vocabulary, not the context a generation may be using.
        return self.tokenize(text)

    def context_tokens(self) -> list[int]:
        """The tokens whose KV the context holds (the last prompt and its generation)."""
        return [int(t) for t in self._llama.input_ids[: self._llama.n_tokens]]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat, from the model's own chat template."""
        template = self._llama.metadata.get("tokenizer.chat_template", "")
        return str(Template(template).render(messages=messages, add_generation_prompt=True))

    def generate(
        self,
        prompt: str,
        sampling: Sampling,
        usage: Usage,
        cancelled: threading.Event,
        continuation: str = "",
    ) -> Generator[Piece, None, None]:
        """Yields the generated text token by token; `usage` is filled as it goes.

        `continuation` is text already generated for this prompt (by a peer that was lost): it
        joins the prompt's context, and generation goes on after it.
        """
        # One tokenization of the whole: tokenizing the continuation alone would add a space.
        tokens = self.tokenize(prompt + continuation)
        if len(tokens) + sampling.max_tokens > self.context:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens and maxTokens is {sampling.max_tokens}:"
                f" more than the model's context of {self.context}"
            )
        usage.prompt_tokens = len(self.tokenize(prompt)) if continuation else len(tokens)
        started = time.monotonic()
        usage.cached_tokens = _common_prefix(self.context_tokens(), tokens)
        if sampling.seed is not None:
            self._llama.set_seed(sampling.seed)
        # Token by token, so counts are exact and a cancel stops at the next token.
        tokens_out = self._llama.generate(
            tokens,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            temp=sampling.temperature,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            logits_processor=LogitsProcessorList([self._without_eos])
            if sampling.ignore_eos
            else None,
        )
        # Holds a character split across tokens; bytes that can never be UTF-8 become U+FFFD,
        # or one stray byte token would swallow all the text after it.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        for token in tokens_out:
            if cancelled.is_set():
                yield Piece("", "cancelled")
                return
            if usage.first_token_seconds is None:
                usage.first_token_seconds = time.monotonic() - started
            if token == self._llama.token_eos():
                yield Piece("", "stop")
                return
            usage.completion_tokens += 1
            piece = decoder.decode(self._llama.detokenize([token], special=False))
            text += piece
            stop_at = min((i for s in sampling.stop if (i := text.find(s)) >= 0), default=-1)
            if stop_at >= 0:
                yield Piece(piece[: max(0, len(piece) - (len(text) - stop_at))], "stop")
                return
            if usage.completion_tokens >= sampling.max_tokens:
                yield Piece(piece, "length")
                return
            yield Piece(piece)

    def _without_eos(
        self, _: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        # As llama.cpp's server does for ignore_eos: the end token can never be drawn.
        scores[self._llama.token_eos()] = -np.inf
        return scores


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
