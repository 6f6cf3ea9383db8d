"""The Kubernetes permissions the operator's code uses, for the chart's ClusterRole/Role.

The chart grants exactly these (tests/chart asserts it). tests/operator/test_operator.py
records every call the operator makes against the emulator and checks both directions:
nothing used is missing here, and nothing here is unused except the grants listed there
(paths the tests exercise separately, and `get` on kopf's peerings, which the emulator
run does not reach but kopf's peering code may issue against a real API server).
"""

from __future__ import annotations

OPERATOR_RULES: list[dict[str, list[str]]] = [
    # the custom resource: kopf watches and patches it (finalizers, progress annotations)
    {
        "apiGroups": ["psft.dev"],
        "resources": ["psftjobs"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # the Workflow's owner reference to its job sets blockOwnerDeletion, which clusters with
    # the OwnerReferencesPermissionEnforcement admission plugin (OpenShift) allow only to
    # whoever may update the owner's finalizers; no call of ours uses it
    {"apiGroups": ["psft.dev"], "resources": ["psftjobs/finalizers"], "verbs": ["update"]},
    # status is written only through the status subresource
    {"apiGroups": ["psft.dev"], "resources": ["psftjobs/status"], "verbs": ["patch"]},
    # the owned Argo Workflow: created, watched, suspended/resumed, deleted on restart
    {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflows"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    # the stage pods' ServiceAccount must exist before the Workflow is created
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]},
    # Events on PSFTJobs (kopf posts core/v1 Events)
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
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
