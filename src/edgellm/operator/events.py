"""Kubernetes Events for the transitions a user wants in `kubectl describe`.

Posted with the plain client rather than kopf's poster, because most of them come from the
operator's own loops, outside any kopf handler. Failing to post one is logged, never fatal.
"""

import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

logger = logging.getLogger(__name__)

COMPONENT = "edgellm-operator"


class EventRecorder:
    def __init__(self, api: client.ApiClient, cluster: str) -> None:
        self.api = api
        self.cluster = cluster

    def record(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        metadata = body["metadata"]
        # Events of cluster-scoped objects live in `default`, where kubectl describe looks.
        namespace = metadata.get("namespace") or "default"
        now = datetime.now(UTC).isoformat()
        event = {
            "metadata": {"generateName": f"{metadata['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": metadata["name"],
                "namespace": metadata.get("namespace"),
                "uid": metadata.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.cluster,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            client.CoreV1Api(self.api).create_namespaced_event(namespace, event)
        except client.ApiException as e:
            logger.warning("posting event %s on %s failed: %s", reason, metadata["name"], e.reason)
