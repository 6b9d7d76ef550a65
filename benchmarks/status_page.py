"""Status page benchmark: how long the router's status page takes to render with 1,000 peers,
in Debian's chromium (headless, driven by Playwright), one page of 50 peers and all at once.

Starts `edgellm router --anonymous --peers-file` over `--peers` generated peers (every state,
nothing behind their endpoints, so the router does not probe them), then loads the page
`--loads` times per layout, each in a fresh tab of one browser. For each load, from the
browser's navigation timing: the server's time for the HTML (request start to response end),
the first contentful paint, and the time until the page is loaded and rendered (navigation
start to the end of the load event); and the JSON API's time over httpx. Writes JSON to --out
and prints it.

    python -m benchmarks.status_page --peers 1000 --out bench-results/status-page.json
"""

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from playwright.sync_api import sync_playwright
from tests.browser import chromium, chromium_missing
from tests.builders import many_peers

from benchmarks.common import Processes, say, summary, until
from edgellm.dev.cluster import free_port

LAYOUTS = {"a page of 50 peers": 50, "every peer on one page": 1000}

_TIMING = """() => {
  const [n] = performance.getEntriesByType("navigation");
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  return {server: n.responseEnd - n.requestStart, paint: paint ? paint.startTime : null,
          loaded: n.loadEventEnd, bytes: n.transferSize};
}"""


def run(peers: int, loads: int, workdir: Path) -> dict[str, Any]:
    listed = workdir / "peers.yaml"
    listed.write_text(yaml.safe_dump_all(many_peers(peers, datetime.now(UTC).isoformat())))
    processes = Processes(workdir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        processes.start(
            "router",
            *("router", "--anonymous", f"--peers-file={listed}", f"--port={port}"),
            "--probe-interval=0",
        )
        until(lambda: processes.serves(url), 60, "the router answers")
        results: dict[str, Any] = {}
        with sync_playwright() as driver, chromium(driver) as browser:
            for layout, per_page in LAYOUTS.items():
                say(f"{layout}: {loads} loads")
                timings = []
                for _ in range(loads):
                    page = browser.new_page()
                    page.goto(f"{url}/?per_page={per_page}")
                    page.wait_for_function(
                        "performance.getEntriesByType('navigation')[0].loadEventEnd > 0"
                    )
                    timings.append(page.evaluate(_TIMING))
                    page.close()
                results[layout] = {
                    "rows": per_page,
                    "kib": round(timings[-1]["bytes"] / 1024, 1),
                    "server_ms": summary([t["server"] for t in timings], 1),
                    "first_paint_ms": summary([t["paint"] for t in timings if t["paint"]], 1),
                    "rendered_ms": summary([t["loaded"] for t in timings], 1),
                }
        api = []
        for _ in range(loads):
            started = time.perf_counter()
            httpx.get(f"{url}/v1/federation", timeout=30).raise_for_status()
            api.append((time.perf_counter() - started) * 1000)
        results["JSON API, a page of 50 peers"] = {"ms": summary(api, 1)}
        return {"peers": peers, "loads": loads, "results": results}
    finally:
        processes.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=20, help="page loads per layout")
    args = parser.parse_args()
    missing = chromium_missing()
    if missing:
        sys.exit(missing)
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-status-") as workdir:
        report = run(args.peers, args.loads, Path(workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
