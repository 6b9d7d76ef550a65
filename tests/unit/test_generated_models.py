"""The generated models are real GGUF files that llama.cpp loads, tokenises and runs."""

from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama

from edgellm.worker.models import TINY, write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Llama:
    path = write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)
    return Llama(model_path=str(path), n_ctx=0, verbose=False)


def test_the_model_says_it_has_random_weights(tiny: Llama) -> None:
    assert "random weights" in tiny.metadata["general.description"]
    assert tiny.n_ctx() == TINY.context


def test_words_of_the_vocabulary_are_single_tokens(tiny: Llama) -> None:
    pieces = [tiny.detokenize([t]) for t in tiny.tokenize(b"serve large models", add_bos=False)]
    assert pieces == [b" serve", b" large", b" models"]


def test_greedy_generation_is_repeatable_and_seeds_change_the_weights(
    tiny: Llama, tmp_path: Path
) -> None:
    def greedy(model: Llama) -> tuple[str, int]:
        out: Any = model.create_completion("Why pool home GPUs", max_tokens=12, temperature=0)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    first = greedy(tiny)
    assert first == greedy(tiny)
    assert first[1] == 12
    other = Llama(model_path=str(write_model(tmp_path / "seed1.gguf", TINY, seed=1)), verbose=False)
    assert greedy(other)[0] != first[0]
