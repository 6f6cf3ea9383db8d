"""The Kubernetes permissions the operator's code uses, for the chart's ClusterRole/Role.

The chart grants exactly these (tests/chart asserts it). tests/operator/test_operator.py
records every call the operator makes against the emulator and checks both directions:
nothing used is missing here, and nothing here is unused except the grants listed there
(paths the tests exercise separately, and three grants kept for the chart's published
contract that the code was measured not to use: get on psftjobs/status, get on peerings,
create on events.k8s.io Events).
"""

from __future__ import annotations

OPERATOR_RULES: list[dict[str, list[str]]] = [
    # the custom resource: kopf watches and patches it (finalizers, progress annotations)
    {
        "apiGroups": ["psft.dev"],
        "resources": ["psftjobs"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # status is written only through the status subresource
    {"apiGroups": ["psft.dev"], "resources": ["psftjobs/status"], "verbs": ["get", "patch"]},
    # the owned Argo Workflow: created, watched, suspended/resumed, deleted on restart
    {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflows"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # Events on PSFTJobs (kopf posts core/v1 Events; events.k8s.io kept for the chart)
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    # kopf's discovery of namespaces and custom resources at runtime
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    # kopf peering (leader election between replicas)
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["kopfpeerings", "clusterkopfpeerings"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # S3 credentials of jobs with storage.deleteOnJobDeletion (artifact cleanup)
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]
