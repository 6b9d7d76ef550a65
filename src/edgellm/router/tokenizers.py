"""Prompts tokenized in the router itself, for models whose GGUF file it can read.

Looking a prompt up in the KV index needs its tokens exactly as the worker counts them. Asking
a worker costs a round trip on every request; with the model's file at hand (`edgellm router
--tokenizer NAME=PATH`), llama.cpp loads its vocabulary alone (no weights, a few MB) and the
router tokenizes in process, with the model's own chat template, as the worker does.
"""

from pathlib import Path

from jinja2 import Template
from llama_cpp import Llama

from edgellm.workerapi.protocol import TokenizeChatRequest, TokenizeRequest


class GgufTokenizer:
    def __init__(self, path: Path) -> None:
        self._llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._template = Template(self._llama.metadata.get("tokenizer.chat_template", ""))

    def text(self, request: TokenizeRequest) -> str:
        """The prompt as the model reads it: the text, or the messages through the model's
        chat template (as the worker renders them)."""
        if not isinstance(request, TokenizeChatRequest):
            return request.prompt
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        return str(self._template.render(messages=messages, add_generation_prompt=True))

    def tokenize(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=True, special=True))

    def tokens(self, request: TokenizeRequest) -> list[int]:
        """What a worker's `/tokenize` would answer, without asking one."""
        return self.tokenize(self.text(request))
