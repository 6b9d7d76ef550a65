"""Prompts tokenized in the router itself, for models whose GGUF file it can read.

Looking a prompt up in the KV index needs its tokens exactly as the worker counts them. Asking
a worker costs a round trip on every request; with the model's file at hand (`edgellm router
--tokenizer NAME=PATH`), llama.cpp loads its vocabulary alone (no weights, a few MB) and the
router tokenizes in process, with the model's own chat template, as the worker does.
"""

from pathlib import Path
from typing import Any

from jinja2 import Template
from llama_cpp import Llama


class GgufTokenizer:
    def __init__(self, path: Path) -> None:
        self._llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._template = Template(self._llama.metadata.get("tokenizer.chat_template", ""))

    def text(self, prompt: dict[str, Any]) -> str:
        """A worker request body's prompt as the model reads it: `prompt`, or `messages`
        through the model's chat template."""
        if prompt.get("prompt"):
            return str(prompt["prompt"])
        return str(self._template.render(messages=prompt["messages"], add_generation_prompt=True))

    def tokenize(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=True, special=True))

    def tokens(self, prompt: dict[str, Any]) -> list[int]:
        return self.tokenize(self.text(prompt))
