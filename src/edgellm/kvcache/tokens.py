"""A prompt's tokens as its model's workers count them, for looking its blocks up in a KV index.

The operator and the router have no weights: they ask a worker of the model (`POST
/v1/tokenize`, the worker API's body), so chat templates and tokenizers are the worker's own.
"""

import logging
from collections.abc import Sequence
from typing import Any

import httpx

logger = logging.getLogger(__name__)


async def tokenize_on_worker(
    client: httpx.AsyncClient, endpoints: Sequence[str], prompt: dict[str, Any]
) -> list[int] | None:
    """The tokens from the first of `endpoints` that answers (two tries, no more: this only
    informs a preference); None when none does."""
    for endpoint in endpoints[:2]:
        try:
            url = f"{endpoint.rstrip('/')}/v1/tokenize"
            response = await client.post(url, json=prompt, timeout=2.0)
            return [int(t) for t in response.raise_for_status().json()["tokens"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            logger.info("tokenizing on %s for the KV index: %s", endpoint, e)
    return None
