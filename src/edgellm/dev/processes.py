"""The local clusters' processes: started in sessions of their own, found again by pid, stopped.

Components outlive `edgellm dev up` (their pids are kept in each cluster's state file), so every
check here guards against a pid that was reused by another program since.
"""

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

STOP_GRACE_SECONDS = 10.0


def netns_command(netns: str, command: Sequence[str]) -> list[str]:
    """`command` in the network namespace `netns` (made by `ip netns add`), and in this mount
    namespace: unlike `ip netns exec`, nsenter leaves mounts shared, as kubelet and containerd
    need (kubelet's volume mounts must be visible where runc starts the containers)."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *command]


def spawn(command: Sequence[str], log: Path, cwd: Path, env: dict[str, str]) -> int:
    """Starts `command` in a session of its own, its output appended to `log`: Ctrl-C on the
    caller does not reach it, and it outlives the caller. Returns its pid."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            env=env,
        )
    return process.pid


def alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier `dev up`): ask the kernel instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _is_zombie(pid)


def runs(pid: int, program: str) -> bool:
    """Whether `pid` is alive and still runs `program` (its argv[0]'s file name): only such a
    process may be signalled, whatever took the pid since."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return Path(argv0).name == program and alive(pid)


def terminate(pid: int, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while alive(pid):
        time.sleep(0.05)


def process_usage(pid: int) -> tuple[float, float]:
    """(resident memory in MiB, CPU seconds so far) of a process, for benchmarks' figures."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss_kib(pid) / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
