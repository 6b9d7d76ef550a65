"""The llama.cpp backend: one GGUF model in one llama.cpp context, through llama-cpp-python.

The worker serves it through `llamaworker.LlamaCppWorker`, which calls `generate`: it yields
each token as llama.cpp samples it (counts are exact, stop strings are honoured), so a client
sees the first token as soon as it exists and a cancelled request stops generating at the next
token. llama-cpp-python's `Llama` is not safe across threads and has no continuous batching, so
the caller gives requests turns (the worker's `turn`); prompts that share a prefix with the
previous one reuse its KV cache.

For prefill/decode disaggregation, `prefill` computes a prompt's KV without generating and
`export_kv_state` writes the context's state as bytes; another worker of the same model loads
them with `import_kv_state` and generates as if it had computed the prompt itself. The bytes
are llama.cpp's own state behind a header that says what they are::

    b"EDGEKV" | version: u16 | header length: u32 | header (JSON) | llama.cpp state

The header names the model (a fingerprint of the GGUF file), the tokens and the state's size
and CRC-32, so that a state of another model, another prompt or cut short is refused before
llama.cpp reads it. No pickle: the bytes come from another peer.

Errors::

    ValueError
    ├── PromptTooLongError  the prompt and maxTokens do not fit the context (`backend.py`)
    └── KVStateError        KV state bytes that this worker cannot load
"""

import codecs
import ctypes
import hashlib
import json
import struct
import threading
import time
import zlib
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, Final

import llama_cpp
import numpy as np
import numpy.typing as npt
from jinja2 import Template  # the engine of chat templates, as in llama.cpp's own server
from llama_cpp import Llama, LogitsProcessorList

from edgellm.kvcache.index import common_prefix
from edgellm.worker import rpc
from edgellm.worker.backend import Piece, PromptTooLongError, Sampling, Usage


class KVStateError(ValueError):
    """KV state bytes refused: another model, another prompt, another format, or corrupt."""


KV_STATE_MAGIC: Final = b"EDGEKV"
KV_STATE_VERSION: Final = 1
_PREAMBLE = struct.Struct("<6sHI")  # magic, version, header length
_FINGERPRINT_CHUNKS = 16
_FINGERPRINT_CHUNK_BYTES = 64 * 1024


def model_fingerprint(path: Path, metadata: dict[str, str]) -> str:
    """Names a GGUF file's contents: its size, metadata and 16 chunks spread over its tensors.

    Hashing the whole file would take seconds per GB at every start; the chunks tell apart
    models whose metadata and size agree (a fine-tune, or the same shape with other seeds).
    """
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    last = max(size - _FINGERPRINT_CHUNK_BYTES, 0)
    with path.open("rb") as file:
        for i in range(_FINGERPRINT_CHUNKS):
            file.seek(last * i // (_FINGERPRINT_CHUNKS - 1))
            digest.update(file.read(_FINGERPRINT_CHUNK_BYTES))
    return digest.hexdigest()


class LlamaCppBackend:
    def __init__(
        self,
        model: Path,
        *,
        context: int = 0,
        threads: int | None = None,
        rpc_servers: Sequence[str] = (),
        layers: Sequence[int] = (),
    ) -> None:
        """With `rpc_servers`, the model is split: `layers` says how many consecutive layers
        this process keeps (the first) and each server holds, in order (see `rpc.py`)."""
        self.model_path = model
        offload: dict[str, Any] = {}
        if rpc_servers:
            if len(layers) != len(rpc_servers) + 1:
                raise ValueError(
                    f"{len(rpc_servers)} RPC servers need {len(rpc_servers) + 1}"
                    f" layer counts, this process's first; got {len(layers)}"
                )
            rpc.use_servers(rpc_servers)
            n_gpu_layers, tensor_split = rpc.layer_offload(layers)
            # Without mmap, this process holds only its own layers, not the whole file.
            offload = {
                "n_gpu_layers": n_gpu_layers,
                "tensor_split": tensor_split,
                "use_mmap": False,
            }
        self._llama = Llama(
            model_path=str(model),
            n_ctx=context,  # 0: the model's own context length
            n_threads=threads,
            verbose=False,
            **offload,
        )
        if rpc_servers:
            architecture = self._llama.metadata.get("general.architecture", "")
            blocks = int(self._llama.metadata.get(f"{architecture}.block_count", 0))
            if sum(layers) != blocks:
                raise ValueError(
                    f"the layer counts add up to {sum(layers)}; the model has {blocks}"
                )
        self._model_identity = {
            "name": self._llama.metadata.get("general.name", model.stem),
            "fingerprint": model_fingerprint(model, self._llama.metadata),
        }

    @property
    def context(self) -> int:
        return int(self._llama.n_ctx())

    @property
    def model_id(self) -> str:
        """The model's name and fingerprint: what KV shared with other peers is labelled with."""
        return f"{self._model_identity['name']}@{self._model_identity['fingerprint']}"

    def tokenize(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=True, special=True))

    def context_tokens(self) -> list[int]:
        """The tokens whose KV the context holds (the last prompt and its generation)."""
        return [int(t) for t in self._llama.input_ids[: self._llama.n_tokens]]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat, from the model's own chat template."""
        template = self._llama.metadata.get("tokenizer.chat_template", "")
        return str(Template(template).render(messages=messages, add_generation_prompt=True))

    def generate(
        self, prompt: str, sampling: Sampling, usage: Usage, cancelled: threading.Event
    ) -> Generator[Piece, None, None]:
        """Yields the generated text token by token; `usage` is filled as it goes."""
        tokens = self._prompt_tokens(prompt, sampling.max_tokens, usage)
        started = time.monotonic()
        usage.cached_tokens = common_prefix(self.context_tokens(), tokens)
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

    def prefill(self, prompt: str, max_tokens: int, usage: Usage) -> float:
        """Computes the KV of `prompt` without generating; returns the seconds it took. The
        common prefix with what the context holds is reused, as in `generate`."""
        tokens = self._prompt_tokens(prompt, max_tokens, usage)
        started = time.monotonic()
        cached = common_prefix(self.context_tokens(), tokens)
        # The last token is evaluated anew even when cached, as `generate` does: the context's
        # logits are then this prompt's, should the next request sample right after it.
        kept = self._keep(min(cached, len(tokens) - 1))
        usage.cached_tokens = cached if kept else 0
        self._llama.eval(tokens[kept:])
        return time.monotonic() - started

    def export_kv_state(self) -> bytes:
        """The context's tokens and llama.cpp state, in the format `import_kv_state` reads."""
        ctx = self._llama.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(ctx, buffer, size)
        state = memoryview(buffer).cast("B")[:written]  # copied once, into the result
        tokens = self.context_tokens()
        header = json.dumps(
            {
                "model": self._model_identity,
                "nTokens": len(tokens),
                "tokens": tokens,
                "stateBytes": len(state),
                "stateCrc32": zlib.crc32(state),
            }
        ).encode()
        preamble = _PREAMBLE.pack(KV_STATE_MAGIC, KV_STATE_VERSION, len(header))
        return b"".join((preamble, header, state))

    def import_kv_state(self, data: bytes, tokens: list[int], prefix: int | None = None) -> int:
        """Loads a state that `export_kv_state` wrote for a prefix of `tokens` (the prompt about
        to be generated from) and returns how many tokens it holds.

        With `prefix`, only the state's first `prefix` tokens are kept and must begin `tokens`:
        a state saved after a generation also holds what was generated after its prompt.
        Raises KVStateError when the bytes are not such a state of this model; the context is
        then unchanged, or empty if llama.cpp itself refused them.
        """
        header, offset = self._kv_state_header(data)
        held: list[int] = header["tokens"]
        kept = len(held) if prefix is None else prefix
        if not 0 < kept <= len(held) or tokens[:kept] != held[:kept]:
            raise KVStateError("the KV state is of another prompt")
        size = len(data) - offset
        state = (ctypes.c_uint8 * size).from_buffer_copy(data, offset)
        if llama_cpp.llama_state_set_data(self._llama.ctx, state, size) != size:
            self._llama.n_tokens = 0  # llama.cpp emptied the context
            raise KVStateError("llama.cpp refused the KV state (another context layout?)")
        memory = llama_cpp.llama_get_memory(self._llama.ctx)
        if memory is None or llama_cpp.llama_memory_seq_pos_max(memory, 0) != len(held) - 1:
            self._llama.n_tokens = 0  # the next eval clears what was loaded
            raise KVStateError(f"the KV state does not hold the {len(held)} tokens it names")
        self._llama.input_ids[: len(held)] = held
        # The state's logits are not trusted for sampling (llama-cpp-python's `load_state` says
        # the same): the last token kept is evaluated again, so the first generated token is
        # exactly the one this worker would compute from the prompt.
        if self._keep(kept - 1) != kept - 1:
            raise KVStateError("this model cannot drop the last tokens of a loaded KV state")
        self._llama.eval(held[kept - 1 : kept])
        return kept

    def _kv_state_header(self, data: bytes) -> tuple[dict[str, Any], int]:
        """The header of KV state bytes, checked against this model and context, and where the
        llama.cpp state begins."""
        if len(data) < _PREAMBLE.size:
            raise KVStateError(f"{len(data)} bytes are too few for a KV state")
        magic, version, length = _PREAMBLE.unpack_from(data)
        if magic != KV_STATE_MAGIC:
            raise KVStateError("not an EdgeLLM KV state")
        if version != KV_STATE_VERSION:
            raise KVStateError(f"KV state format {version}; this worker reads {KV_STATE_VERSION}")
        offset = _PREAMBLE.size + length
        if offset > len(data):
            raise KVStateError("the KV state is cut short in its header")
        try:
            header = json.loads(data[_PREAMBLE.size : offset])
            model, tokens = header["model"], header["tokens"]
            count, size, crc = header["nTokens"], header["stateBytes"], header["stateCrc32"]
        except (ValueError, TypeError, KeyError) as e:  # JSON and Unicode errors are ValueErrors
            raise KVStateError(f"the KV state's header is malformed: {e}") from e
        if model != self._model_identity:
            raise KVStateError(
                f"the KV state is of another model: {model!r}, not {self._model_identity!r}"
            )
        n_vocab = self._llama.n_vocab()
        if not (
            isinstance(tokens, list)
            and all(type(t) is int and 0 <= t < n_vocab for t in tokens)
            and 0 < len(tokens) == count < self.context
        ):
            raise KVStateError("the KV state's tokens are not of this model and context")
        if size != len(data) - offset:
            raise KVStateError(f"the KV state has {len(data) - offset} bytes, not {size}")
        if zlib.crc32(memoryview(data)[offset:]) != crc:
            raise KVStateError("the KV state is corrupt: its CRC-32 does not match")
        return header, offset

    def _prompt_tokens(self, prompt: str, max_tokens: int, usage: Usage) -> list[int]:
        """The prompt's tokens, checked to fit the context with max_tokens, counted in `usage`.
        A prompt that goes on from text a lost peer generated is tokenized whole: tokenizing
        that text alone would add a space."""
        tokens = self.tokenize(prompt)
        if len(tokens) + max_tokens > self.context:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens and max_tokens is {max_tokens}:"
                f" more than the model's context of {self.context}"
            )
        usage.prompt_tokens = len(tokens)
        return tokens

    def _keep(self, count: int) -> int:
        """Keeps the context's first `count` tokens for the next `eval`, which drops the KV
        after them; keeps none when the model cannot drop part of its state (a recurrent one)."""
        memory = llama_cpp.llama_get_memory(self._llama.ctx)
        partial = memory is not None and llama_cpp.llama_memory_seq_rm(memory, -1, count, -1)
        self._llama.n_tokens = count if count > 0 and partial else 0
        return int(self._llama.n_tokens)

    def _without_eos(
        self, _: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        # As llama.cpp's server does for ignore_eos: the end token can never be drawn.
        scores[self._llama.token_eos()] = -np.inf
        return scores
