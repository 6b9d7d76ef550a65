"""Request benchmark: scheduling latency with 1,000 peers, the requests per second one operator
sustains, and the end-to-end overhead of an InferenceRequest over calling llama.cpp directly.

1. Scheduling in process: the real `schedule()` with `default_profile()` over 1,000 generated
   peers (3 clusters, CPU and GPU machines, a catalogue of models, loads, some draining, not
   Ready or unreachable) for many request specs. Each plugin's share comes from
   `Decision.plugin_seconds`.
2. One real local cluster with one real operator (`edgellm operator`, the operator identity) and
   real `edgellm worker`s serving the generated tiny model, joined as peers (`edgellm join`):
   - overhead: the same prompts and sampling (temperature 0, ignoreEos, fixed maxTokens) through
     `LlamaCppBackend.generate` in this process, the worker's `POST /v1/completions`, and an
     InferenceRequest through the operator (tiny model; the bench model too unless --smoke);
   - throughput: a burst of requests created as fast as the API takes them, until all finish;
   - then the cluster gets 1,000 PeerNodes in all (its own, with heartbeats, and mirrors of two
     other clusters' peers, as a member of a 3-cluster federation holds them; peers holding the
     tiny model point at the real workers), and requests are created at a fixed rate (DESIGN's
     target: scheduling p99 under 1 s at 50 requests/s).
   Latencies are taken from the client's clock at creation (a creationTimestamp has whole
   seconds) to the times the operator writes into the status: the Scheduled condition's
   lastTransitionTime, startTime, completionTime.

Progress goes to stderr; the figures are printed and written as JSON to --out.

    python -m benchmarks.inference_requests --out bench-results/requests.json
    python -m benchmarks.inference_requests --smoke --out bench-results/requests-smoke.json

(Not `requests.py`: run as a script, it would shadow the `requests` package the Kubernetes
client imports.)
"""

import argparse
import copy
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from kubernetes import client
from tests import builders

from benchmarks.common import BenchmarkError, Processes, say, summary, until
from edgellm.api import (
    GROUP,
    KINDS,
    ORIGIN_CLUSTER_LABEL,
    VERSION,
    InferenceRequestSpec,
    PeerNode,
    SamplingParams,
    custom_resource_definition,
)
from edgellm.dev.cluster import LocalCluster, free_port
from edgellm.dev.federation import LocalFederation
from edgellm.dev.processes import process_usage
from edgellm.federation.rbac import (
    FEDERATION_NAMESPACE,
    federation_manifests,
    member_service_account,
)
from edgellm.kube import api_client, apply, install_crds, new_api_client
from edgellm.scheduling import Candidate, Decision, default_profile, schedule
from edgellm.worker.backend import Sampling, Usage
from edgellm.worker.llamacpp import LlamaCppBackend
from edgellm.worker.models import BENCH, TINY, ModelShape, write_model

T = TypeVar("T")
Body = dict[str, Any]

CLUSTERS = ("edge-1", "edge-2", "edge-3")  # the operator runs in the first
NAMESPACE = "default"
PHASE_LABEL = "bench.edgellm.io/phase"
TERMINAL = ("Succeeded", "Failed", "Cancelled")
NODE_PEERS = 3  # the KWOK nodes of a local cluster are peers too (labelled edgellm.io/peer)
# About 100 tokens of the generated models' vocabulary; each repeat puts its number in front,
# so no repeat reuses the KV of the one before.
PROMPT = " ".join(
    ["explain why home lab machines can serve large language models together without a"]
    + ["central server because each peer shares its memory and compute with the others"] * 4
)

CPU_MODELS = (
    "tiny-random",
    "qwen2.5-0.5b-instruct",
    "llama-3.2-1b-instruct",
    "llama-3.2-3b-instruct",
    "phi-3.5-mini-instruct",
)
GPU_MODELS = (
    "mistral-7b-instruct",
    "llama-3.1-8b-instruct",
    "qwen2.5-14b-instruct",
    "qwen2.5-32b-instruct",
)
ACCELERATORS = (
    ("nvidia", "NVIDIA-GeForce-RTX-4090", "24Gi"),
    ("nvidia", "NVIDIA-GeForce-RTX-3090", "24Gi"),
    ("nvidia", "NVIDIA-RTX-A4000", "16Gi"),
    ("amd", "AMD-Radeon-RX-7900-XTX", "24Gi"),
)
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")
REGION_LABEL = "edgellm.io/region"
ACCELERATOR_LABEL = "edgellm.io/accelerator"


@dataclass(frozen=True)
class Size:
    peers: int
    specs: int  # request specs scheduled in process
    repeats: int  # of each way of generating, per model, for the overhead
    overhead_tokens: int
    burst: int  # requests created at once
    rate: float  # requests per second with every peer present
    rate_seconds: float
    idle: int  # requests one at a time with every peer present
    max_tokens: int  # of the burst, idle and rate requests
    workers: int
    bench_model: bool
    timeout: float  # for every wait


FULL = Size(
    peers=1000,
    specs=1000,
    repeats=20,
    overhead_tokens=32,
    burst=200,
    rate=50.0,
    rate_seconds=10.0,
    idle=20,
    max_tokens=4,
    workers=2,
    bench_model=True,
    timeout=300.0,
)
SMOKE = Size(
    peers=200,
    specs=100,
    repeats=5,
    overhead_tokens=16,
    burst=20,
    rate=10.0,
    rate_seconds=2.0,
    idle=5,
    max_tokens=2,
    workers=1,
    bench_model=False,
    timeout=120.0,
)


# --- generated peers and requests ---------------------------------------------------------


def peer_body(index: int, rng: random.Random, tiny_endpoints: list[str]) -> Body:
    """A PeerNode as the API returns it, status included, like the peers of a federation of home
    labs: mostly CPU machines, a quarter with a GPU, a few models each, various loads.

    Peers holding tiny-random point at `tiny_endpoints` when given (the real workers)."""
    cluster = CLUSTERS[index % len(CLUSTERS)]
    gpu = rng.random() < 0.25
    models = rng.sample(CPU_MODELS, rng.randint(1, 3))
    if gpu:
        models += rng.sample(GPU_MODELS, rng.randint(1, 2))
    region = rng.choice(REGIONS)
    name = f"{cluster}-peer-{index:04d}"
    endpoint = f"http://10.{index // 250}.{index % 250}.1:8600"
    if "tiny-random" in models and tiny_endpoints:
        endpoint = tiny_endpoints[index % len(tiny_endpoints)]
    roll = rng.random()
    roles = ["prefill"] if roll < 0.1 else ["decode"] if roll < 0.2 else ["prefill", "decode"]
    resources: Body = {
        "cpu": str(rng.choice((4, 8, 16, 32))),
        "memory": f"{rng.choice((8, 16, 32, 64, 128))}Gi",
    }
    if gpu:
        vendor, product, memory = rng.choice(ACCELERATORS)
        resources["accelerators"] = [{"vendor": vendor, "model": product, "memory": memory}]
    now = datetime.now(UTC)
    stamp = now.isoformat()
    ready = rng.random() < 0.88
    reachable = cluster == CLUSTERS[0] or rng.random() < 0.95
    unschedulable = rng.random() < 0.03
    busy = rng.random() < 0.6
    draining = "Unschedulable" if unschedulable else "Schedulable"

    conditions = [
        builders.condition("Draining", unschedulable, draining, stamp),
        builders.condition(
            "Ready", ready, "HeartbeatFresh" if ready else "HeartbeatExpired", stamp
        ),
        builders.condition(
            "Reachable", reachable, "Probed" if reachable else "MemberUnreachable", stamp
        ),
    ]
    load = {
        "runningRequests": rng.randint(1, 2) if busy else 0,
        "queuedRequests": rng.randint(0, 6) if busy else 0,
        "kvCacheUsage": round(rng.uniform(0.05, 0.95) if busy else 0.01, 2),
        "tokensPerSecond": round(rng.uniform(5, 80), 1),
    }
    return builders.peer_body(
        name,
        metadata={
            "uid": f"00000000-0000-4000-8000-{index:012d}",
            "resourceVersion": str(1000 + index),
            "generation": 1,
            "creationTimestamp": (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "labels": {
                ORIGIN_CLUSTER_LABEL: cluster,
                REGION_LABEL: region,
                ACCELERATOR_LABEL: "gpu" if gpu else "cpu",
            },
        },
        status={
            "conditions": conditions,
            "lastHeartbeatTime": stamp,
            "load": load,
            "observedGeneration": 1,
        },
        cluster=cluster,
        endpoint=endpoint,
        roles=roles,
        backends=["llamacpp", "vllm"] if gpu else ["llamacpp"],
        resources=resources,
        network={
            "uplinkMbps": rng.choice((20.0, 50.0, 100.0, 1000.0)),
            "downlinkMbps": rng.choice((100.0, 300.0, 1000.0)),
            "region": region,
        },
        models=[
            {"name": m, "format": "safetensors" if m in GPU_MODELS else "gguf"} for m in models
        ],
        trustLevel=rng.choices(("untrusted", "community", "trusted"), (2, 6, 2))[0],
        unschedulable=unschedulable,
        heartbeatTTLSeconds=3600,
    )


def request_spec(rng: random.Random) -> InferenceRequestSpec:
    """A request as users write them: mostly a popular model, some with placement rules."""
    model = rng.choices((*CPU_MODELS, *GPU_MODELS, "llama-9000b"), (8, 6, 5, 5, 3, 4, 4, 3, 2, 1))[
        0
    ]
    placement: Body = {}
    if rng.random() < 0.2:
        placement["minTrust"] = "trusted"
    if rng.random() < 0.2:
        placement["clusters"] = rng.sample(CLUSTERS, rng.randint(1, 2))
    roll = rng.random()
    if roll < 0.15:
        placement["peerSelector"] = {"matchLabels": {REGION_LABEL: rng.choice(REGIONS)}}
    elif roll < 0.25:
        placement["peerSelector"] = {
            "matchExpressions": [{"key": ACCELERATOR_LABEL, "operator": "In", "values": ["gpu"]}]
        }
    return InferenceRequestSpec.model_validate(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Hello there"}],
            "sampling": {"maxTokens": rng.choice((16, 64, 256))},
            "placement": placement,
        }
    )


def bench_scheduling(size: Size) -> dict[str, Any]:
    """`schedule()` over `size.peers` generated peers, validated once as the operator keeps
    them (the cluster phases measure the operator's own path)."""
    rng = random.Random(4)
    bodies = [peer_body(i, rng, []) for i in range(size.peers)]
    profile = default_profile()
    candidates = [
        Candidate(peer, local=peer.spec.cluster == CLUSTERS[0])
        for peer in (PeerNode.model_validate(b) for b in bodies)
    ]
    specs = [request_spec(rng) for _ in range(size.specs)]
    say(f"scheduling {len(specs)} request specs over {len(candidates)} peers in process")
    alone: list[float] = []
    plugins: dict[str, float] = {}
    picked = Counter[str]()
    decided_seconds = 0.0
    unschedulable = 0
    for spec in specs:
        started = time.perf_counter()
        decision = schedule(spec, candidates, profile)
        elapsed = time.perf_counter() - started
        alone.append(elapsed * 1000)
        if isinstance(decision, Decision):
            decided_seconds += elapsed
            for name, seconds in decision.plugin_seconds.items():
                plugins[name] = plugins.get(name, 0.0) + seconds
            picked[decision.peer.peer.spec.cluster] += 1
        else:
            unschedulable += 1
    ranked = sorted(plugins.items(), key=lambda pair: -pair[1])
    shares = {name: round(100 * seconds / decided_seconds, 1) for name, seconds in ranked}
    shares["framework (loops, picker)"] = round(100 - sum(shares.values()), 1)
    result: dict[str, Any] = {
        "peers": len(candidates),
        "clusters": len(CLUSTERS),
        "ready_peers": sum(
            1
            for c in candidates
            if any(x.type == "Ready" and x.status == "True" for x in c.peer.status.conditions)
        ),
        "request_specs": len(specs),
        "unschedulable_specs": unschedulable,
        "chosen_per_cluster": dict(sorted(picked.items())),
        "schedule_ms": summary(alone),
        "plugin_share_percent": shares,
    }
    say(f"schedule(): p50 {result['schedule_ms']['p50']} ms, p99 {result['schedule_ms']['p99']} ms")
    return result


# --- processes ----------------------------------------------------------------------------


@dataclass
class Worker:
    model: str
    peer: str
    url: str
    path: Path


@dataclass
class Bench:
    """The running cluster, operator and workers, and how to talk to them."""

    cluster: LocalCluster
    api: client.ApiClient
    processes: Processes
    operator: subprocess.Popen[bytes]
    workers: list[Worker]
    size: Size
    submitted: dict[str, float] = field(default_factory=dict)  # name -> time.time()
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoints: dict[str, str] = field(default_factory=dict)  # peer -> its endpoint, as read

    @property
    def objects(self) -> Any:
        return client.CustomObjectsApi(self.api)

    def submit(self, phase: str, name: str, spec: Body) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceRequest",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {PHASE_LABEL: phase}},
            "spec": spec,
        }
        sent = time.time()
        self.objects.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "inferencerequests", body
        )
        with self.lock:
            self.submitted[name] = sent

    def requests(self, phase: str) -> list[Body]:
        listed = self.objects.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "inferencerequests", label_selector=f"{PHASE_LABEL}={phase}"
        )
        return list(listed["items"])

    def wait_finished(self, phase: str, count: int) -> list[Body]:
        """Every request of `phase` once all are finished; progress every few seconds."""
        started = last = time.monotonic()

        def finished() -> list[Body] | None:
            nonlocal last
            self.processes.check()
            items = self.requests(phase)
            done = [r for r in items if r.get("status", {}).get("phase") in TERMINAL]
            if time.monotonic() - last >= 3:
                last = time.monotonic()
                say(f"  {phase}: {len(done)}/{count} finished ({last - started:.0f}s)")
            return items if len(done) == count else None

        try:
            return until(finished, self.size.timeout, f"the {count} {phase} requests finish", 0.5)
        except BenchmarkError as e:  # figures of what finished beat none
            say(f"  {e}: measuring what finished")
            return self.requests(phase)

    def one(self, phase: str, name: str, spec: Body) -> Body:
        """Creates one request and returns it once it is finished."""
        self.submit(phase, name, spec)

        def finished() -> Body | None:
            body: Body = self.objects.get_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, "inferencerequests", name
            )
            return body if body.get("status", {}).get("phase") in TERMINAL else None

        return until(finished, self.size.timeout, f"{name} finishes", 0.01)


def stamp(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


@dataclass(frozen=True)
class Stages:
    """Seconds from the client's creation of a request to what its status records."""

    phase: str
    reason: str
    scheduled: float | None
    running: float | None
    finished: float | None
    finished_at: float | None
    from_creation_timestamp: float | None  # to Scheduled, as DESIGN words it (whole seconds)
    status_total: float | None


def stages(bench: Bench, body: Body) -> Stages:
    status = body.get("status", {})
    sent = bench.submitted[body["metadata"]["name"]]
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    scheduled = stamp(conditions.get("Scheduled", {}).get("lastTransitionTime"))
    started, finished = stamp(status.get("startTime")), stamp(status.get("completionTime"))
    created = stamp(body["metadata"]["creationTimestamp"])
    assert created is not None

    def since(moment: float | None, origin: float = sent) -> float | None:
        return None if moment is None else moment - origin

    return Stages(
        phase=status.get("phase", "Pending"),
        reason=conditions.get("Complete", {}).get("reason", ""),
        scheduled=since(scheduled),
        running=since(started),
        finished=since(finished),
        finished_at=finished,
        from_creation_timestamp=since(scheduled, created),
        status_total=status.get("timings", {}).get("totalSeconds"),
    )


def ms(values: list[float | None]) -> list[float]:
    return [v * 1000 for v in values if v is not None]


def load_figures(bench: Bench, bodies: list[Body]) -> dict[str, Any]:
    """Requests per second and latencies of a phase's requests (those unfinished at the deadline
    are counted, and left out of the latencies)."""
    measured = [stages(bench, b) for b in bodies]
    sent = [bench.submitted[b["metadata"]["name"]] for b in bodies]
    succeeded = [s for s in measured if s.phase == "Succeeded"]
    ends = [s.finished_at for s in succeeded if s.finished_at is not None]
    span = max(ends) - min(sent) if ends else 0.0
    served = Counter(_served_by(bench, body) for body in bodies)
    return {
        "requests": len(bodies),
        "succeeded": len(succeeded),
        "failed": dict(Counter(s.reason for s in measured if s.phase in ("Failed", "Cancelled"))),
        "unfinished": sum(1 for s in measured if s.phase not in TERMINAL),
        "unscheduled": sum(1 for s in measured if s.scheduled is None),
        "served_per_worker": dict(sorted(served.items())),
        "seconds_until_all_finished": round(span, 1),
        "created_per_second": round(len(sent) / max(max(sent) - min(sent), 1e-9), 1),
        "completed_per_second": round(len(succeeded) / span, 1) if span else None,
        "scheduled_ms": summary(ms([s.scheduled for s in measured]), 1),
        "succeeded_ms": summary(ms([s.finished for s in succeeded]), 1),
        "scheduled_from_creation_timestamp_ms": summary(
            ms([s.from_creation_timestamp for s in measured]), 1
        ),
    }


def _served_by(bench: Bench, body: Body) -> str:
    """The worker behind the request's peer (many generated peers point at one worker)."""
    peer = body.get("status", {}).get("assignment", {}).get("decodePeer")
    if peer is None:
        return "none"
    endpoints = {w.url: w.peer for w in bench.workers}
    if peer not in bench.endpoints:
        listed = bench.objects.list_cluster_custom_object(GROUP, VERSION, "peernodes")
        bench.endpoints |= {p["metadata"]["name"]: p["spec"]["endpoint"] for p in listed["items"]}
    return endpoints.get(bench.endpoints.get(peer, ""), "elsewhere")


# --- the cluster --------------------------------------------------------------------------


@contextmanager
def running_bench(size: Size, workdir: Path) -> Iterator[Bench]:
    """A local cluster with its operator and workers joined as peers; all stopped at the end."""
    federation = LocalFederation(workdir / "clusters")
    processes = Processes(workdir)
    say("starting a local cluster")
    federation.up(1, progress=lambda line: say(f"  {line}"))
    try:
        cluster = federation.clusters[0]
        admin = cluster.kubeconfig("admin")
        with api_client(admin) as api:
            install_crds(api, [custom_resource_definition(k) for k in KINDS])
            apply(api, federation_manifests(cluster.name))
        admin_file = workdir / "admin.kubeconfig"
        admin_file.write_text(yaml.safe_dump(admin))
        operator_file = workdir / "operator.kubeconfig"
        operator_file.write_text(yaml.safe_dump(cluster.kubeconfig("operator")))
        operator = processes.start(
            "operator",
            "operator",
            f"--cluster={cluster.name}",
            f"--kubeconfig={operator_file}",
            "--metrics-port=0",
        )
        shapes: list[tuple[ModelShape, int]] = [(TINY, i) for i in range(size.workers)]
        if size.bench_model:
            shapes.append((BENCH, 0))
        workers = []
        for shape, index in shapes:
            models = workdir / f"models-{shape.name}"
            path = models / f"{shape.name}.gguf"
            if not path.exists():
                say(f"writing the {shape.name} model")
                write_model(path, shape)
            port = free_port()
            peer = f"{cluster.name}-{shape.name.removesuffix('-random')}-{index}"
            processes.start(f"worker-{peer}", "worker", f"--model={path}", f"--port={port}")
            workers.append(Worker(shape.name, peer, f"http://127.0.0.1:{port}", path))
        for worker in workers:
            until(
                partial(processes.answer, worker.url),
                size.timeout,
                f"the worker {worker.peer} answers /healthz",
            )
            processes.start(
                f"join-{worker.peer}",
                "join",
                f"--kubeconfig={admin_file}",
                f"--name={worker.peer}",
                f"--endpoint={worker.url}",
                f"--models-dir={worker.path.parent}",
            )
        api = new_api_client(admin)
        try:
            bench = Bench(cluster, api, processes, operator, workers, size)
            for worker in workers:
                ready = partial(_ready, bench, worker.peer)
                until(ready, size.timeout, f"the peer {worker.peer} is Ready")
            # The operator makes the KWOK nodes peers on its first pass over them.
            until(
                partial(_peer_count_at_least, bench, NODE_PEERS + len(workers)),
                size.timeout,
                "the KWOK nodes are peers",
            )
            say(f"operator and {len(workers)} worker(s) ready: {[w.peer for w in workers]}")
            yield bench
        finally:
            api.close()
    except BaseException:
        for name, _ in processes.running:
            say(f"the log of {name} ends with:\n{processes.tail(name, 20)}")
        raise
    finally:
        processes.stop()
        federation.down()
        say("stopped the operator, the workers and the cluster")


def _peer_count_at_least(bench: Bench, count: int) -> bool:
    bench.processes.check()
    peers = bench.objects.list_cluster_custom_object(GROUP, VERSION, "peernodes")["items"]
    return len(peers) >= count


def _ready(bench: Bench, name: str) -> bool:
    bench.processes.check()
    try:
        body = bench.objects.get_cluster_custom_object(GROUP, VERSION, "peernodes", name)
    except client.ApiException:
        return False
    conditions = body.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


# --- overhead ---------------------------------------------------------------------------


def bench_overhead(bench: Bench, model: str) -> dict[str, Any]:
    """The same prompts and sampling three ways; each starts once the operator and the workers
    are idle, and their order turns at every repeat, so drift and leftover work hit all alike."""
    size = bench.size
    worker = next(w for w in bench.workers if w.model == model)
    backend = LlamaCppBackend(worker.path)  # llama.cpp's default threads, as the worker
    params = SamplingParams(max_tokens=size.overhead_tokens, temperature=0.0, ignore_eos=True)
    sampling = Sampling.of(params)  # as the worker
    wire = params.to_wire()
    openai_sampling = {"max_tokens": params.max_tokens, "temperature": 0, "ignore_eos": True}
    say(f"overhead with {model}: {size.repeats} repeats x (in process, worker HTTP, operator)")
    direct: list[float] = []
    http: list[float] = []
    through: list[Stages] = []
    texts: set[str] = set()
    prompt_tokens = 0

    with httpx.Client(timeout=60) as session:

        def in_process(prompt: str) -> float:
            nonlocal prompt_tokens
            usage = Usage()
            started = time.perf_counter()
            pieces = list(backend.generate(prompt, sampling, usage, threading.Event()))
            elapsed = time.perf_counter() - started
            prompt_tokens = usage.prompt_tokens
            texts.add(prompt + "".join(p.text for p in pieces))
            return elapsed

        def worker_http(prompt: str) -> float:
            started = time.perf_counter()
            body = {"model": model, "prompt": prompt, **openai_sampling}
            response = session.post(f"{worker.url}/v1/completions", json=body)
            response.raise_for_status()
            elapsed = time.perf_counter() - started
            texts.add(prompt + response.json()["choices"][0]["text"])
            return elapsed

        def operator(prompt: str, repeat: int) -> Stages:
            name = f"overhead-{model}-{repeat + 1}"
            spec = {"model": model, "prompt": prompt, "sampling": wire}
            body = bench.one(f"overhead-{model}", name, spec)
            if body["status"]["phase"] != "Succeeded":
                raise BenchmarkError(f"{name} did not succeed: {body['status']}")
            texts.add(prompt + body["status"]["output"]["text"])
            return stages(bench, body)

        for repeat in range(-1, size.repeats):  # -1: a warm-up, not counted
            prompt = f"{repeat + 1} {PROMPT}"
            order = ["in process", "worker HTTP", "operator"]
            shift = repeat % len(order)
            for way in order[shift:] + order[:shift]:
                settle(bench)
                if way == "in process":
                    seconds = in_process(prompt)
                    if repeat >= 0:
                        direct.append(seconds * 1000)
                elif way == "worker HTTP":
                    seconds = worker_http(prompt)
                    if repeat >= 0:
                        http.append(seconds * 1000)
                else:
                    measured = operator(prompt, repeat)
                    if repeat >= 0:
                        through.append(measured)
    median = statistics.median
    finished = ms([s.finished for s in through])
    operator_ms = median(finished)
    result = {
        "prompt_tokens": prompt_tokens,
        "max_tokens": size.overhead_tokens,
        "repeats": size.repeats,
        # Greedy sampling: one text per prompt when all three ways did the same work.
        "same_text_all_three_ways": len(texts) == size.repeats + 1,
        "in_process_ms": round(median(direct), 2),
        "worker_http_ms": round(median(http), 2),
        "operator_ms": round(operator_ms, 2),
        "operator_stages_ms": {
            "scheduled": round(median(ms([s.scheduled for s in through])), 2),
            "running": round(median(ms([s.running for s in through])), 2),
            "succeeded": round(operator_ms, 2),
        },
        "operator_p99_ms": summary(finished, 1)["p99"],
        "status_total_seconds_median": median(
            [s.status_total for s in through if s.status_total is not None]
        ),
        "overhead_over_in_process_ms": round(operator_ms - median(direct), 2),
        "overhead_over_worker_http_ms": round(operator_ms - median(http), 2),
        # The fastest of each way: what it costs when nothing else on the machine interferes
        # (llama.cpp's prompt threads wait on each other, so a busy machine slows them a lot).
        "fastest_ms": {
            "in_process": round(min(direct), 2),
            "worker_http": round(min(http), 2),
            "operator": round(min(finished), 2),
        },
    }
    say(
        f"  {model}: in process {result['in_process_ms']} ms, worker HTTP"
        f" {result['worker_http_ms']} ms, through the operator {result['operator_ms']} ms"
    )
    return result


def settle(bench: Bench, timeout: float = 5.0) -> None:
    """Waits (up to `timeout`) until the operator, the workers and this process (llama.cpp's
    threads spin a while after their work) use no CPU for 0.2 s, so a measurement does not pay
    for the work the previous one left behind."""
    pids = [os.getpid(), *(process.pid for _, process in bench.processes.running)]

    def ticks() -> float:
        return sum(process_usage(pid)[1] for pid in pids)

    deadline = time.monotonic() + timeout
    last = ticks()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = ticks()
        if now == last:
            return
        last = now


def worker_rate(bench: Bench, count: int) -> float:
    """Requests per second one tiny-model worker answers over HTTP, one after another, with the
    load phases' prompts and sampling: what the operator's figures compare with."""
    worker = next(w for w in bench.workers if w.model == "tiny-random")
    settle(bench)
    with httpx.Client(timeout=60) as session:
        started = time.perf_counter()
        for i in range(count):
            spec = _spec(bench, i)
            payload = {
                "model": spec["model"],
                "prompt": spec["prompt"],
                "max_tokens": bench.size.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            session.post(f"{worker.url}/v1/completions", json=payload).raise_for_status()
        return round(count / (time.perf_counter() - started), 1)


def _spec(bench: Bench, index: int) -> Body:
    return {
        "model": "tiny-random",
        "prompt": f"{index} {PROMPT}",
        "sampling": {"maxTokens": bench.size.max_tokens, "temperature": 0, "ignoreEos": True},
    }


# --- load ----------------------------------------------------------------------------------


def bench_burst(bench: Bench) -> dict[str, Any]:
    count = bench.size.burst
    say(f"burst: creating {count} requests as fast as the API takes them")
    with operator_usage(bench) as usage, ThreadPoolExecutor(max_workers=4) as pool:
        for future in [
            pool.submit(bench.submit, "burst", f"burst-{i:05d}", _spec(bench, i))
            for i in range(count)
        ]:
            future.result()
        bodies = bench.wait_finished("burst", count)
    result = {**load_figures(bench, bodies), "operator": usage.figures(count)}
    say(
        f"  burst: {result['completed_per_second']} requests/s completed, creation to Succeeded"
        f" p50 {result['succeeded_ms'].get('p50')} ms, p99 {result['succeeded_ms'].get('p99')} ms"
    )
    return result


@dataclass
class OperatorUsage:
    """The operator's CPU time and peak RSS over a phase."""

    pid: int
    cpu_before: float
    peak_rss_mib: float = 0.0
    cpu_after: float = 0.0

    def sample(self) -> None:
        rss, self.cpu_after = process_usage(self.pid)
        self.peak_rss_mib = max(self.peak_rss_mib, rss)

    def figures(self, requests: int) -> dict[str, float]:
        return {
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "cpu_seconds_per_request": round((self.cpu_after - self.cpu_before) / requests, 4),
        }


@contextmanager
def operator_usage(bench: Bench) -> Iterator[OperatorUsage]:
    usage = OperatorUsage(bench.operator.pid, process_usage(bench.operator.pid)[1])
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            usage.sample()

    sampler = threading.Thread(target=sample, name="operator-usage", daemon=True)
    sampler.start()
    try:
        yield usage
    finally:
        stop.set()
        sampler.join()
        usage.sample()


def add_peers(bench: Bench) -> dict[str, Any]:
    """PeerNodes up to `size.peers` in all: this cluster's own (with a heartbeat, or none yet)
    and mirrors of the two other clusters' peers, as the operator of a member holds them."""
    existing = len(bench.objects.list_cluster_custom_object(GROUP, VERSION, "peernodes")["items"])
    target = bench.size.peers
    count = target - existing
    rng = random.Random(5)
    tiny = [w.url for w in bench.workers if w.model == "tiny-random"]
    bodies = [peer_body(i, rng, tiny) for i in range(count)]
    say(f"creating {count} PeerNodes ({existing} peers already)")
    # Mirrors are written as the other members' operators write them: with their credentials
    # (the admission policy lets nobody else write a mirror).
    writers = {CLUSTERS[0]: bench.api}
    writers |= {name: member_client(bench, name) for name in CLUSTERS[1:]}

    def create(body: Body) -> None:
        objects = client.CustomObjectsApi(writers[body["spec"]["cluster"]])
        created = {k: body[k] for k in ("apiVersion", "kind", "spec")}
        metadata = body["metadata"]
        created["metadata"] = {"name": metadata["name"], "labels": metadata["labels"]}
        objects.create_cluster_custom_object(GROUP, VERSION, "peernodes", created)
        status = dict(body["status"])
        if body["spec"]["cluster"] == CLUSTERS[0]:
            # The operator assesses its own peers from their heartbeats.
            del status["conditions"], status["observedGeneration"]
            if not any(
                c["type"] == "Ready" and c["status"] == "True" for c in body["status"]["conditions"]
            ):
                del status["lastHeartbeatTime"]  # awaiting its first heartbeat: not Ready
        objects.patch_cluster_custom_object_status(
            GROUP, VERSION, "peernodes", metadata["name"], {"status": status}
        )

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for future in [pool.submit(create, b) for b in bodies]:
                future.result()
    finally:
        for name in CLUSTERS[1:]:
            writers[name].close()
    say(f"  created in {time.monotonic() - started:.1f}s; waiting for the operator to assess them")
    own = [b["metadata"]["name"] for b in bodies if b["spec"]["cluster"] == CLUSTERS[0]]

    def assessed() -> bool:
        bench.processes.check()
        items = bench.objects.list_cluster_custom_object(GROUP, VERSION, "peernodes")["items"]
        ready = {
            p["metadata"]["name"]
            for p in items
            if any(c["type"] == "Ready" for c in p.get("status", {}).get("conditions", []))
        }
        return len(items) == target and all(name in ready for name in own)

    until(assessed, bench.size.timeout, "the operator assesses every peer of its cluster", 1.0)
    say(f"  the operator assessed its {len(own)} own peers ({time.monotonic() - started:.1f}s)")
    by_cluster = Counter(b["spec"]["cluster"] for b in bodies)
    return {
        "peers": target,
        "created_per_cluster": dict(sorted(by_cluster.items())),
        "operator_rss_mib_with_peers": round(process_usage(bench.operator.pid)[0], 1),
    }


def member_client(bench: Bench, member: str) -> client.ApiClient:
    """A client with the credentials `member` would hold for this cluster after joining it: a
    token of its ServiceAccount here (no FederationMember: the operator syncs with nobody)."""
    core = client.CoreV1Api(bench.api)
    account = member_service_account(member)
    try:
        core.create_namespaced_service_account(
            FEDERATION_NAMESPACE, {"metadata": {"name": account}}
        )
    except client.ApiException as e:
        if e.status != 409:
            raise
    request = {"spec": {"expirationSeconds": 3600}}
    token = core.create_namespaced_service_account_token(account, FEDERATION_NAMESPACE, request)
    kubeconfig = copy.deepcopy(bench.cluster.kubeconfig("admin"))
    for user in kubeconfig["users"]:
        user["user"] = {"token": token.status.token}
    return new_api_client(kubeconfig)


def bench_idle(bench: Bench) -> dict[str, Any]:
    say(f"idle: {bench.size.idle} requests one at a time with every peer present")
    bodies = [bench.one("idle", f"idle-{i:05d}", _spec(bench, i)) for i in range(bench.size.idle)]
    measured = [stages(bench, b) for b in bodies]
    return {
        "requests": len(bodies),
        "succeeded": sum(1 for s in measured if s.phase == "Succeeded"),
        "scheduled_ms": summary(ms([s.scheduled for s in measured]), 1),
        "succeeded_ms": summary(ms([s.finished for s in measured]), 1),
    }


def bench_rate(bench: Bench) -> dict[str, Any]:
    size = bench.size
    count = round(size.rate * size.rate_seconds)
    say(f"rate: {count} requests at {size.rate:g}/s with {size.peers} peers")
    with operator_usage(bench) as usage, ThreadPoolExecutor(max_workers=8) as pool:
        started = time.monotonic()
        futures = []
        for i in range(count):
            # Pacing the creations, not waiting on anything.
            time.sleep(max(0.0, started + i / size.rate - time.monotonic()))
            futures.append(pool.submit(bench.submit, "rate", f"rate-{i:05d}", _spec(bench, i)))
        for future in futures:
            future.result()
        bodies = bench.wait_finished("rate", count)
    result = {
        "target_rate": size.rate,
        **load_figures(bench, bodies),
        "operator": usage.figures(count),
    }
    say(
        f"  rate: created {result['created_per_second']}/s, completed"
        f" {result['completed_per_second']}/s; scheduled p50 {result['scheduled_ms'].get('p50')}"
        f" ms, p99 {result['scheduled_ms'].get('p99')} ms"
    )
    return result


# --- main ----------------------------------------------------------------------------------


def run(size: Size, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "cpus": os.cpu_count(),
        # Other work on the machine shows here: the figures are only as quiet as it was.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "scheduling_in_process": bench_scheduling(size),
    }
    with running_bench(size, workdir) as bench:
        models = ["tiny-random"] + (["bench-random"] if size.bench_model else [])
        result["overhead"] = {model: bench_overhead(bench, model) for model in models}
        result["throughput"] = {
            "workers": size.workers,
            "max_tokens": size.max_tokens,
            # One worker's own pace, one request after another: the ceiling without the operator.
            "one_worker_http_per_second": worker_rate(bench, max(size.burst // 4, 5)),
            "burst": bench_burst(bench),
        }
        peers = add_peers(bench)
        result["operator_scheduling"] = {
            **peers,
            "idle": bench_idle(bench),
            "at_rate": bench_rate(bench),
            "target": "1,000 peers across 3 clusters, scheduling p99 under 1 s at 50 requests/s,"
            " RSS under 250 MB (DESIGN.md)",
        }
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["notes"] = [
        "*_ms in the cluster: from the client's clock just before it created the request to the"
        " time the operator wrote into the status (Scheduled's lastTransitionTime, startTime,"
        " completionTime), on the same machine",
        "scheduled_from_creation_timestamp_ms: from metadata.creationTimestamp, which has whole"
        " seconds, so it overstates by up to 1 s; so does status.timings (queue, TTFT, total)",
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="small sizes that finish in about a minute"
    )
    parser.add_argument("--peers", type=int, help=f"peers in all (default {FULL.peers})")
    parser.add_argument(
        "--specs", type=int, help=f"request specs scheduled in process (default {FULL.specs})"
    )
    parser.add_argument(
        "--repeats", type=int, help=f"repeats of each way of generating (default {FULL.repeats})"
    )
    parser.add_argument(
        "--burst", type=int, help=f"requests created at once (default {FULL.burst})"
    )
    parser.add_argument(
        "--rate", type=float, help=f"requests per second with every peer (default {FULL.rate:g})"
    )
    parser.add_argument(
        "--rate-seconds", type=float, help=f"for how long (default {FULL.rate_seconds:g})"
    )
    parser.add_argument(
        "--workers", type=int, help=f"tiny-model workers joined as peers (default {FULL.workers})"
    )
    parser.add_argument(
        "--bench-model",
        action=argparse.BooleanOptionalAction,
        help="also measure the overhead with the bench model (default: not with --smoke)",
    )
    parser.add_argument("--timeout", type=float, help="seconds for each wait")
    parser.add_argument("--out", type=Path, default=Path("bench-results/requests.json"))
    args = parser.parse_args()
    base = SMOKE if args.smoke else FULL
    chosen = {
        name: getattr(args, name)
        for name in (
            "peers",
            "specs",
            "repeats",
            "burst",
            "rate",
            "rate_seconds",
            "workers",
            "bench_model",
            "timeout",
        )
        if getattr(args, name) is not None
    }
    size = replace(base, **chosen)
    # A SIGTERM unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as workdir:
        result = {"smoke": args.smoke, "size": asdict(size), **run(size, Path(workdir))}
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    say(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
