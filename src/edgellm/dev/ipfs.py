"""A few Kubo daemons on loopback in a private swarm: the IPFS that KV blocks travel over in the
end-to-end tests and benchmarks.

Each daemon has its own repo (`ipfs init --profile=test`: no bootstrap peers, no mDNS), the
swarm's generated `swarm.key` (with `LIBP2P_FORCE_PNET=1` a daemon without one refuses to start
rather than join the public network), its own API, gateway and swarm ports, and a connection to
every other daemon, made once it is up. Provider records travel over Kubo's LAN DHT, which the
test profile opens to loopback peers (`Routing.LoopbackAddressesOnLanDHT`). Unlike the control
planes of `cluster.py`, the daemons are children of the caller and live as long as it holds
them: `down()` stops and reaps every one. The e2e fixtures call this.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx

from edgellm.dev.cluster import free_port
from edgellm.dev.errors import ComponentFailedError
from edgellm.dev.processes import STOP_GRACE_SECONDS
from edgellm.dev.tools import tool

_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class KuboNode:
    """One daemon's identity and addresses, fixed at `ipfs init` so peers can name each other."""

    name: str
    repo: Path
    peer_id: str
    api_port: int
    gateway_port: int
    swarm_port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def swarm_address(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.swarm_port}/p2p/{self.peer_id}"

    @property
    def log(self) -> Path:
        return self.repo.parent / f"{self.name}.log"


def swarm_key() -> str:
    """A fresh pre-shared key in the format of go-libp2p's pnet (`/key/swarm/psk/1.0.0/`)."""
    return f"/key/swarm/psk/1.0.0/\n/base16/\n{secrets.token_hex(32)}\n"


class LocalSwarm:
    """`size` Kubo daemons rooted at `root`, sharing one swarm key."""

    def __init__(self, root: Path, size: int, name: str = "ipfs") -> None:
        if size < 1:
            raise ValueError(f"a swarm needs at least one daemon, not {size}")
        self.root = root
        self.size = size
        self.name = name
        self.nodes: list[KuboNode] = []
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    # --- bring-up --------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> None:
        """Initialises fresh repos, starts every daemon and waits until each has the others as
        swarm peers. On any failure the daemons already started are stopped."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        key = swarm_key()
        self.nodes = [self._init(f"{self.name}-{i}", key) for i in range(self.size)]
        for node in self.nodes:
            self._configure(node)
        deadline = time.monotonic() + timeout
        try:
            for index in range(self.size):
                self._start(index)
                self._wait_answering(index, deadline)
                self._connect(index)
            self._wait_meshed(deadline)
        except BaseException:
            self.down()
            raise

    def _init(self, name: str, key: str) -> KuboNode:
        repo = self.root / name
        init = subprocess.run(
            [str(tool("ipfs")), "init", "--profile=test", "--empty-repo"],
            env=self._env(repo),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if init.returncode != 0:
            raise ComponentFailedError(
                self.name, name, f"`ipfs init` failed: {init.stderr.strip()}", repo
            )
        (repo / "swarm.key").write_text(key)
        identity = json.loads((repo / "config").read_text())["Identity"]
        return KuboNode(
            name=name,
            repo=repo,
            peer_id=identity["PeerID"],
            api_port=free_port(),
            gateway_port=free_port(),
            swarm_port=free_port(),
        )

    def _configure(self, node: KuboNode) -> None:
        path = node.repo / "config"
        config = json.loads(path.read_text())
        config["Addresses"].update(
            API=f"/ip4/127.0.0.1/tcp/{node.api_port}",
            Gateway=f"/ip4/127.0.0.1/tcp/{node.gateway_port}",
            Swarm=[f"/ip4/127.0.0.1/tcp/{node.swarm_port}"],
        )
        # Private networks work over TCP only; Kubo warns for each other transport left on.
        config["Swarm"]["Transports"]["Network"] = {
            "Websocket": False,
            "WebTransport": False,
            "WebRTCDirect": False,
            "QUIC": False,
        }
        path.write_text(json.dumps(config, indent=2))

    def _env(self, repo: Path) -> dict[str, str]:
        return {
            **os.environ,
            "IPFS_PATH": str(repo),
            "LIBP2P_FORCE_PNET": "1",
            # Nothing outside loopback is reachable, and a test run should not phone home.
            "IPFS_TELEMETRY": "off",
        }

    def _start(self, index: int) -> None:
        node = self.nodes[index]
        with node.log.open("ab") as log:
            self._processes[index] = subprocess.Popen(
                [str(tool("ipfs")), "daemon", "--migrate=false"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.repo,
                # Ctrl-C on the test run reaches us, and we stop the daemons in order.
                start_new_session=True,
                env=self._env(node.repo),
            )

    def _failed(self, index: int, reason: str) -> ComponentFailedError:
        node = self.nodes[index]
        try:
            tail = node.log.read_text(errors="replace").splitlines()[-10:]
        except OSError:
            tail = []
        return ComponentFailedError(self.name, node.name, "\n    ".join([reason, *tail]), node.log)

    def _wait_answering(self, index: int, deadline: float) -> None:
        node, process = self.nodes[index], self._processes[index]
        with httpx.Client(timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise self._failed(index, f"exited with code {process.returncode} on start")
                try:
                    if client.post(f"{node.api_url}/api/v0/id").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise self._failed(index, f"did not answer `id` at {node.api_url} in time")
                time.sleep(_POLL_SECONDS)

    def _connect(self, index: int) -> None:
        """Connects a daemon that answers to every other running one.

        Not through `Bootstrap`: Kubo 0.42's bitswap never sees a peer connected while the
        daemon is still starting (fixed after it, boxo#1201), so blocks would only travel once
        DHT provider records caught up. Kubo's own CLI tests connect the same way."""
        node = self.nodes[index]
        with httpx.Client(timeout=10.0) as client:
            for other in self._running():
                if other == index:
                    continue
                address = self.nodes[other].swarm_address
                response = client.post(
                    f"{node.api_url}/api/v0/swarm/connect", params={"arg": address}
                )
                if response.status_code != 200:
                    raise self._failed(index, f"could not connect to {address}: {response.text}")

    def _wait_meshed(self, deadline: float) -> None:
        """Waits until every running daemon has every other running one as a swarm peer."""
        running = self._running()
        with httpx.Client(timeout=2.0) as client:
            for index in running:
                others = {self.nodes[i].peer_id for i in running if i != index}
                while not others <= (peers := self._swarm_peers(client, index)):
                    if time.monotonic() > deadline:
                        missing = ", ".join(sorted(others - peers))
                        raise self._failed(index, f"is not connected to {missing} in time")
                    time.sleep(_POLL_SECONDS)

    def _swarm_peers(self, client: httpx.Client, index: int) -> set[str]:
        process = self._processes[index]
        if process.poll() is not None:
            raise self._failed(index, f"exited with code {process.returncode}")
        try:
            response = client.post(f"{self.nodes[index].api_url}/api/v0/swarm/peers")
            return {peer["Peer"] for peer in response.json().get("Peers") or []}
        except (httpx.HTTPError, ValueError):
            return set()

    def _running(self) -> list[int]:
        return sorted(self._processes)

    # --- faults and teardown ---------------------------------------------------------------

    def pid(self, index: int) -> int:
        return self._processes[index].pid

    def stop(self, index: int) -> None:
        """Stops one daemon (SIGTERM, SIGKILL after a grace period) and reaps it."""
        process = self._processes.pop(index, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start(self, index: int, timeout: float = 60.0) -> None:
        """Starts a stopped daemon again on its repo and ports, and waits until it rejoined."""
        self._start(index)
        deadline = time.monotonic() + timeout
        self._wait_answering(index, deadline)
        self._connect(index)
        self._wait_meshed(deadline)

    def down(self) -> None:
        """Stops every daemon still running, the last started first."""
        for index in sorted(self._processes, reverse=True):
            self.stop(index)

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *_: object) -> None:
        self.down()
