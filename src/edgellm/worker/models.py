"""Small Llama-architecture GGUF models with random weights, for demos, tests and benchmarks.

Model weights cannot be downloaded everywhere EdgeLLM is developed or tested, so
`edgellm model tiny` and `edgellm model bench` write real GGUF files that llama.cpp loads and
runs: a SentencePiece-style vocabulary (byte fallback plus a few hundred words), a chat template,
and seeded random weights. What they generate is noise; their timings, KV-cache sizes and
tokenisation are real. The metadata says so, and the README too.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType

# A chat template in ChatML, the form most instruction-tuned models use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_PARAGRAPH = (
    "the of and to in is that for it as was with be by on not he this are or his from at which"
    " but have an they you were her she there one all we their can has been if more when will"
    " would who so no model models peer peers cluster clusters token tokens cache request home"
    " lab gpu gpus machine machines serve large language federated inference network share"
    " block blocks fast slow pool volunteer people compute memory why because together each"
    " other without central server answer question sentence write explain hello world data"
)
WORDS = tuple(_PARAGRAPH.split())
DESCRIPTION = "random weights written by `edgellm model`: loads and runs, generates noise"


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that decide a model's size and speed."""

    name: str
    embedding: int
    layers: int
    heads: int
    kv_heads: int
    feed_forward: int
    context: int
    dtype: GGMLQuantizationType


TINY = ModelShape("tiny-random", 64, 2, 4, 2, 192, 2048, GGMLQuantizationType.F32)
# Large enough that prefill dominates and KV moves cost something: ~45 MB in f16.
BENCH = ModelShape("bench-random", 512, 8, 8, 4, 1536, 8192, GGMLQuantizationType.F16)
SHAPES = {shape.name: shape for shape in (TINY, BENCH)}


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: special tokens, all 256 bytes (the fallback), printable
    characters, then every prefix of every word. SentencePiece merges two adjacent pieces only
    when their concatenation is a token, so a word is reachable only through its prefixes."""
    tokens = list(SPECIAL)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.USER_DEFINED] * 2  # the ChatML markers are matched as text
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces = ["▁", *(chr(c) for c in range(33, 127))]
    for word in WORDS:
        spelled = f"▁{word}"
        pieces += [spelled[:end] for end in range(2, len(spelled) + 1)]
    pieces = list(dict.fromkeys(pieces))  # unique, in order
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    # Longer pieces score higher, so whole words win over their parts.
    scores = [
        float(len(t)) if kind == TokenType.NORMAL else 0.0
        for t, kind in zip(tokens, types, strict=True)
    ]
    return tokens, scores, [int(t) for t in types]


def write_model(
    path: Path, shape: ModelShape, seed: int = 0, progress: Callable[[str], None] = lambda _: None
) -> Path:
    """Writes the model to `path` (atomically) and returns it."""
    tokens, scores, types = vocabulary()
    rng = np.random.default_rng(seed)
    dtype = np.float16 if shape.dtype == GGMLQuantizationType.F16 else np.float32
    head_dim = shape.embedding // shape.heads
    kv_width = head_dim * shape.kv_heads

    def weights(*dims: int) -> np.ndarray:
        # Scaled like an initialised network, so activations stay finite through the layers.
        scaled: np.ndarray = rng.standard_normal(dims, dtype=np.float32) / np.sqrt(dims[-1])
        return scaled.astype(dtype)

    def norm() -> np.ndarray:
        return np.ones(shape.embedding, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = GGUFWriter(partial, "llama")
    writer.add_name(shape.name)
    writer.add_description(DESCRIPTION)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(SPECIAL.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    # numpy shapes are (rows, columns); GGUF stores them reversed, as llama.cpp expects.
    writer.add_tensor("token_embd.weight", weights(len(tokens), shape.embedding))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weights(len(tokens), shape.embedding))
    for layer in range(shape.layers):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        writer.add_tensor(f"{block}.attn_q.weight", weights(shape.embedding, shape.embedding))
        writer.add_tensor(f"{block}.attn_k.weight", weights(kv_width, shape.embedding))
        writer.add_tensor(f"{block}.attn_v.weight", weights(kv_width, shape.embedding))
        writer.add_tensor(f"{block}.attn_output.weight", weights(shape.embedding, shape.embedding))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(shape.feed_forward, shape.embedding))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(shape.feed_forward, shape.embedding))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(shape.embedding, shape.feed_forward))
        progress(f"{shape.name}: layer {layer + 1}/{shape.layers}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path
