"""The namespaces, roles and bindings that scope what other members and join tokens may do.

A member's credential here is a ServiceAccount in FEDERATION_NAMESPACE; a join token's is a
ServiceAccount in JOIN_NAMESPACE. Roles are bound to those namespaces' ServiceAccount groups, so
minting a credential is creating a ServiceAccount and deleting it revokes every token it issued.
"""

from typing import Any

from edgellm.api import FEDERATION_MEMBER, GROUP, INFERENCE_REQUEST, PEER_NODE, WORKER_POOL

FEDERATION_NAMESPACE = "edgellm-federation"
JOIN_NAMESPACE = "edgellm-join"
MEMBERS_GROUP = f"system:serviceaccounts:{FEDERATION_NAMESPACE}"
JOINERS_GROUP = f"system:serviceaccounts:{JOIN_NAMESPACE}"
IDENTITY_CONFIGMAP = "identity"

OPERATORS_GROUP = "edgellm:operators"
OPERATOR_NAMESPACE = "edgellm-system"
OPERATOR_ACCOUNT = "edgellm-operator"
OPERATOR_SERVICE_ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
MIRROR_POLICY = "edgellm-peer-mirrors"

MEMBER_ROLE = "edgellm:federation-member"
WORKER_POOLS_ROLE = "edgellm:operator-worker-pools"
JOINER_ROLE = "edgellm:federation-joiner"
CREDENTIALS_ROLE = "edgellm:federation-credentials"


def member_service_account(member: str) -> str:
    """The ServiceAccount, in this cluster, whose tokens `member` uses to reach this cluster."""
    return f"member-{member}"


def credentials_secret(member: str) -> str:
    """The Secret, in this cluster, holding this cluster's token for reaching `member`."""
    return f"credentials-{member}"


def _rule(group: str, resources: list[str], verbs: list[str]) -> dict[str, Any]:
    return {"apiGroups": [group], "resources": resources, "verbs": verbs}


def _binding(kind: str, name: str, role_kind: str, role: str, group: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if kind == "RoleBinding":
        metadata["namespace"] = FEDERATION_NAMESPACE
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": metadata,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
    }


def federation_manifests(cluster: str) -> list[dict[str, Any]]:
    """Everything a cluster needs before it can join or be joined, identity included, and the
    operator's role for worker pools."""
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        for name in (FEDERATION_NAMESPACE, JOIN_NAMESPACE)
    ]
    member_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": MEMBER_ROLE},
        "rules": [
            # Mirror the member's own peers here; an admission policy keeps it to those.
            _rule(
                GROUP,
                [PEER_NODE.plural],
                ["get", "list", "watch", "create", "update", "patch", "delete"],
            ),
            _rule(GROUP, [f"{PEER_NODE.plural}/status"], ["get", "update", "patch"]),
            # Learn this cluster's members and introduce new ones to it.
            _rule(GROUP, [FEDERATION_MEMBER.plural], ["get", "list", "create"]),
        ],
    }
    joiner_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": JOINER_ROLE},
        # Register the joining cluster, nothing else.
        "rules": [_rule(GROUP, [FEDERATION_MEMBER.plural], ["get", "create"])],
    }
    credentials_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": CREDENTIALS_ROLE, "namespace": FEDERATION_NAMESPACE},
        "rules": [
            # Mint a credential for a member being introduced (a ServiceAccount and its token).
            _rule("", ["serviceaccounts"], ["get", "create"]),
            _rule("", ["serviceaccounts/token"], ["create"]),
            # Hand this cluster a credential for that member: write-only, never read back.
            _rule("", ["secrets"], ["create", "update"]),
        ],
    }
    identity = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": IDENTITY_CONFIGMAP, "namespace": FEDERATION_NAMESPACE},
        "data": {"cluster": cluster},
    }
    return [
        *namespaces,
        *mirror_policy(),
        member_role,
        joiner_role,
        credentials_role,
        _binding("ClusterRoleBinding", MEMBER_ROLE, "ClusterRole", MEMBER_ROLE, MEMBERS_GROUP),
        _binding("ClusterRoleBinding", JOINER_ROLE, "ClusterRole", JOINER_ROLE, JOINERS_GROUP),
        _binding(
            "RoleBinding", f"{CREDENTIALS_ROLE}-members", "Role", CREDENTIALS_ROLE, MEMBERS_GROUP
        ),
        _binding(
            "RoleBinding", f"{CREDENTIALS_ROLE}-joiners", "Role", CREDENTIALS_ROLE, JOINERS_GROUP
        ),
        identity,
        *worker_pools_manifests(),
    ]


def worker_pools_manifests() -> list[dict[str, Any]]:
    """What the operator needs to keep WorkerPools' Deployments, and nothing more, bound to the
    operator's group and its in-cluster ServiceAccount."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": WORKER_POOLS_ROLE},
        "rules": [
            # Watch pools (wakes the loop on a new spec) and list them every interval.
            _rule(GROUP, [WORKER_POOL.plural], ["list", "watch"]),
            # Report replicas, demand and conditions: the status subresource only.
            _rule(GROUP, [f"{WORKER_POOL.plural}/status"], ["patch"]),
            # The Deployment's owner reference blocks the pool's deletion (blockOwnerDeletion);
            # where the OwnerReferencesPermissionEnforcement admission plugin is on, setting
            # that needs this.
            _rule(GROUP, [f"{WORKER_POOL.plural}/finalizers"], ["update"]),
            # Demand: the unfinished requests for each pool's model.
            _rule(GROUP, [INFERENCE_REQUEST.plural], ["list"]),
            # Check a Deployment of the pool's name is the pool's own, then server-side apply it
            # (apply creates or patches). No delete: the garbage collector follows the owner.
            _rule("apps", ["deployments"], ["get", "create", "patch"]),
            # Why workers are not ready (the scheduler's PodScheduled condition on the pods), and
            # the worker pods to register as peers (their address, readiness, deletion).
            _rule("", ["pods"], ["list"]),
            # The GPUs of a worker's node, as NVIDIA's feature discovery labels describe them.
            _rule("", ["nodes"], ["list"]),
            # Worker pods' PeerNodes: server-side applied, heartbeated, deleted with their pod.
            _rule("edgellm.io", ["peernodes"], ["list", "create", "patch", "delete"]),
            _rule("edgellm.io", ["peernodes/status"], ["patch"]),
            # Events on the pools for `kubectl describe`.
            _rule("", ["events"], ["create"]),
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": WORKER_POOLS_ROLE},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": WORKER_POOLS_ROLE,
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": OPERATORS_GROUP},
            {"kind": "ServiceAccount", "namespace": OPERATOR_NAMESPACE, "name": OPERATOR_ACCOUNT},
        ],
    }
    return [role, binding]


def mirror_policy() -> list[dict[str, Any]]:
    """An admission policy that makes mirrors read-only: a member may write only the mirrors of
    its own peers, and nobody else may write a PeerNode of another cluster, except this
    cluster's operator marking mirrors unreachable (their status)."""
    member_prefix = f"system:serviceaccount:{FEDERATION_NAMESPACE}:member-"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": MIRROR_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE", "DELETE"],
                        "resources": [PEER_NODE.plural, f"{PEER_NODE.plural}/status"],
                    }
                ]
            },
            "variables": [
                {
                    "name": "owner",
                    "expression": "(request.operation == 'DELETE' ? oldObject : object)"
                    ".spec.cluster",
                },
                {
                    "name": "member",
                    "expression": f"request.userInfo.username.startsWith('{member_prefix}') ?"
                    f" request.userInfo.username.substring({len(member_prefix)}) : ''",
                },
                {
                    "name": "operator",
                    "expression": f"'{OPERATORS_GROUP}' in request.userInfo.groups ||"
                    f" request.userInfo.username == '{OPERATOR_SERVICE_ACCOUNT}'",
                },
            ],
            "validations": [
                {
                    "expression": "variables.member == '' || variables.owner == variables.member",
                    "messageExpression": "'member ' + variables.member + ' may only write"
                    " mirrors of its own peers, not of ' + variables.owner",
                },
                {
                    "expression": "variables.member != '' || variables.owner == params.data.cluster"
                    " || (variables.operator && request.subResource == 'status')",
                    "messageExpression": "'this PeerNode is a read-only mirror of a peer of '"
                    " + variables.owner + ': change it in that cluster'",
                },
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": MIRROR_POLICY},
        "spec": {
            "policyName": MIRROR_POLICY,
            "validationActions": ["Deny"],
            "paramRef": {
                "name": IDENTITY_CONFIGMAP,
                "namespace": FEDERATION_NAMESPACE,
                "parameterNotFoundAction": "Deny",
            },
        },
    }
    return [policy, binding]
