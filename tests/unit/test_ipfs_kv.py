"""The IPFS KV cache's pure parts: keys and trusted-keys files, announcements on the wire, the
book of what a worker announced, which prompts are worth saving, and loading a saved state's
prefix into llama.cpp. Saving and loading through real Kubo daemons: tests/e2e/test_kv_ipfs.py."""

import json
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from edgellm.kvcache import ExternalBlockHash, prompt_block_keys
from edgellm.kvcache.blockstore import (
    Announcement,
    BadAnnouncementError,
    KVBlockStore,
    announce,
    block_cid,
    verify_announcement,
)
from edgellm.kvcache.ipfs import KuboClient
from edgellm.worker.backend import Sampling, Usage
from edgellm.worker.ipfskv import (
    IPFSKV,
    AnnouncementBook,
    announced_block,
    announcement_json,
    key_id,
    load_or_create_key,
    load_trusted_keys,
    public_pem,
    read_announcement,
)
from edgellm.worker.llamacpp import KVStateError, LlamaCppBackend
from edgellm.worker.models import TINY, write_model

KEY = Ed25519PrivateKey.generate()


def _announcement(chain: list[int], data: bytes = b"state") -> Announcement:
    return announce(
        KEY,
        peer=key_id(KEY.public_key()),
        model="tiny@f1",
        token_hashes=chain,
        manifest=block_cid(data, "dag-cbor"),
    )


# --- keys ------------------------------------------------------------------------------------


def test_a_missing_key_file_is_created_private_and_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "worker.pem"
    created, new = load_or_create_key(path)
    again, new_again = load_or_create_key(path)
    assert (new, new_again) == (True, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(again.public_key()) == key_id(created.public_key())
    assert key_id(created.public_key()).startswith("ed25519:")


def test_a_key_file_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rsa.pem"
    rsa = generate_private_key(public_exponent=65537, key_size=1024)
    path.write_bytes(rsa.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_or_create_key(path)


def test_trusted_keys_are_found_by_the_peer_name_their_announcements_carry(
    tmp_path: Path,
) -> None:
    other = Ed25519PrivateKey.generate()
    path = tmp_path / "trusted.yaml"
    path.write_text(json.dumps({"alice": public_pem(KEY), "bob": public_pem(other)}))
    trusted = load_trusted_keys(path)
    assert set(trusted) == {key_id(KEY.public_key()), key_id(other.public_key())}
    verify_announcement(_announcement([1, 2]), trusted)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a list\n", "a mapping of labels"),
        ("alice: not a key\n", "alice: not a PEM public key"),
        ("alice: [unclosed\n", "not YAML"),
    ],
    ids=["list", "not-pem", "not-yaml"],
)
def test_a_malformed_trusted_keys_file_is_refused_saying_why(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "trusted.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_trusted_keys(path)


def test_a_trusted_rsa_key_is_refused(tmp_path: Path) -> None:
    rsa = generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = rsa.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    path = tmp_path / "trusted.yaml"
    path.write_text(json.dumps({"carol": pem}))
    with pytest.raises(ValueError, match=r"carol: a .*RSA.*, not an Ed25519 key"):
        load_trusted_keys(path)


# --- announcements on the wire ---------------------------------------------------------------


def test_an_announcement_survives_json_with_its_signature_valid() -> None:
    original = _announcement([1, 2**64 - 1])
    wire = json.loads(json.dumps(announcement_json(original)))
    assert wire["manifest"].startswith("bafyrei")
    read = read_announcement(wire)
    assert read == original
    verify_announcement(read, {original.peer: KEY.public_key()})


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {**announcement_json(_announcement([1])), "manifest": "not a cid"},
        {**announcement_json(_announcement([1])), "signature": "!!"},
        {**announcement_json(_announcement([1])), "tokens": [-1]},
        {**announcement_json(_announcement([1])), "extra": 1},
    ],
    ids=["list", "empty", "bad-cid", "bad-base64", "negative-hash", "extra-field"],
)
def test_what_is_not_an_announcement_is_refused(body: object) -> None:
    with pytest.raises(BadAnnouncementError):
        read_announcement(body)


@pytest.mark.parametrize(
    ("url", "block"),
    [
        ("http://peer:8600/v1/kv/ipfs/42", 42),
        (f"https://peer/v1/kv/ipfs/{2**64 - 1}", 2**64 - 1),
        (f"http://peer/v1/kv/ipfs/{2**64}", None),
        ("http://peer/v1/kv/request-7", None),
        ("http://peer/v1/kv/ipfs/abc", None),
    ],
)
def test_only_announcement_urls_name_a_block(url: str, block: int | None) -> None:
    assert announced_block(url) == block


# --- the book of announcements ---------------------------------------------------------------


def test_a_block_finds_the_shortest_chain_that_holds_it() -> None:
    book = AnnouncementBook()
    long, short = _announcement([1, 2, 3, 4], b"long"), _announcement([1, 2], b"short")
    book.add(long)
    book.add(short)
    assert book.find(ExternalBlockHash(2)) == short
    assert book.find(ExternalBlockHash(4)) == long
    assert book.find(ExternalBlockHash(9)) is None


def test_forgetting_a_chain_uncovers_only_blocks_no_other_chain_holds() -> None:
    book = AnnouncementBook()
    book.add(_announcement([1, 2, 3, 4], b"long"))
    book.add(_announcement([1, 2, 5], b"fork"))
    assert book.remove(ExternalBlockHash(4)) == [3, 4]
    assert book.find(ExternalBlockHash(3)) is None
    assert book.remove(ExternalBlockHash(5)) == [1, 2, 5]
    assert len(book) == 0
    assert book.remove(ExternalBlockHash(5)) == []


# --- which prompts are saved -----------------------------------------------------------------


def _cache(min_tokens: int = 32) -> IPFSKV:
    store = KVBlockStore(KuboClient("http://127.0.0.1:1"), pin_cap_bytes=1 << 20)
    return IPFSKV(store, KEY, {}, model="tiny@f1", seed="0", min_tokens=min_tokens)


def test_a_prompt_is_claimed_once_for_its_full_blocks_and_short_ones_never() -> None:
    cache = _cache(min_tokens=32)
    assert cache.claim(list(range(31))) is None
    tokens = list(range(40))
    prefix = cache.claim(tokens)
    assert prefix is not None
    assert prefix.tokens == tokens[:32]
    assert prefix.chain == prompt_block_keys(tokens, seed="0")
    assert cache.claim(tokens) is None, "being saved"
    cache.release(prefix)
    assert cache.claim(tokens) is not None


def test_min_tokens_below_one_block_is_refused() -> None:
    with pytest.raises(ValueError, match="one block"):
        _cache(min_tokens=8)


# --- loading a saved state's prefix ----------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-random.gguf", TINY)


def test_a_state_saved_after_a_generation_loads_its_prompts_prefix_and_generates_the_same(
    model: Path,
) -> None:
    saver, loader = LlamaCppBackend(model), LlamaCppBackend(model)
    greedy = Sampling(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = ("the federation shares blocks of the cache " * 8).rstrip()
    follow_up = prompt + " and the peers answer each question together"

    def text(backend: LlamaCppBackend, what: str) -> str:
        pieces = backend.generate(what, greedy, Usage(), threading.Event())
        return "".join(p.text for p in pieces)

    text(saver, prompt)
    state = saver.export_kv_state()  # the prompt and what was generated after it
    prompt_tokens = saver.tokenize(prompt)
    prefix = len(prompt_tokens) // 16 * 16
    with pytest.raises(KVStateError, match="another prompt"):
        loader.import_kv_state(state, loader.tokenize(follow_up))
    assert loader.import_kv_state(state, loader.tokenize(follow_up), prefix) == prefix
    assert loader.context_tokens() == prompt_tokens[:prefix]
    loaded = text(loader, follow_up)
    assert loaded == text(LlamaCppBackend(model), follow_up)
