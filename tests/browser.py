"""Debian's chromium, headless, driven by Playwright: the status page's browser tests and its
render benchmark share this.

Playwright never downloads a browser here: it drives the system's chromium
(`hack/host-packages.sh` installs Debian's), with a fresh profile in a temporary directory and
the flags a machine without outside network needs (no background fetches, updates or sync).
"""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from playwright.sync_api import BrowserContext, Playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_missing() -> str | None:
    """Why the browser cannot start here, or None."""
    if shutil.which(CHROMIUM) is None:
        return f"no {CHROMIUM}: run hack/host-packages.sh (Debian's chromium)"
    return None


@contextmanager
def chromium(playwright: Playwright, **options: Any) -> Iterator[BrowserContext]:
    """A browser with a fresh profile; `options` go to Playwright's context (viewport,
    http_credentials, java_script_enabled, ...). One `sync_playwright()` drives them all."""
    with tempfile.TemporaryDirectory(prefix="edgellm-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=list(FLAGS),
            headless=True,
            **{"viewport": {"width": 1440, "height": 900}, **options},
        )
        try:
            yield context
        finally:
            context.close()
