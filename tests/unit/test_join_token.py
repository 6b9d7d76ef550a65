"""Join tokens survive copy and paste, and a damaged one is refused with a clear message."""

import pytest

from edgellm.federation.errors import InvalidJoinTokenError
from edgellm.federation.membership import JoinToken

TOKEN = JoinToken(
    cluster="edge-1", server="https://127.0.0.1:6443", ca_bundle="Q0E=", token="abc.def.ghi"
)


def test_a_token_round_trips() -> None:
    assert JoinToken.decode(TOKEN.encode()) == TOKEN


@pytest.mark.parametrize("text", ["hello", "edgellm-join-v1.###", "edgellm-join-v1.e30="])
def test_a_damaged_token_is_refused(text: str) -> None:
    with pytest.raises(InvalidJoinTokenError):
        JoinToken.decode(text)
