"""The few Kubernetes API calls the operator makes itself (kopf does the watching).

A thin layer over the `kubernetes` client: PSFTJobs and Argo Workflows as plain dicts, and
API errors turned into kopf's retry semantics (`retry_on_api_error`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

JOB_GROUP, JOB_VERSION, JOB_PLURAL = "psft.dev", "v1alpha1", "psftjobs"
WF_GROUP, WF_VERSION, WF_PLURAL = "argoproj.io", "v1alpha1", "workflows"

USER_AGENT = "psft-operator"
REQUEST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds of each call: a server that stops answering must not hold a
handler forever; the timeout is a temporary error and the call is retried."""

Obj = dict[str, Any]

_client: kubernetes.client.ApiClient | None = None
_client_lock = threading.Lock()


CONCURRENCY = 16
"""Handler threads (kopf's max_workers) and HTTP connections. Measured with 500 jobs at
once against the real API server on 2 cores (benchmarks/operator_load.py --real): 16 gave
p99 create->Workflow 22 s, 48 gave 35 s, with the API server's CPU the bottleneck (59
CPU-s against 30): more concurrent handlers only add conflicting status writes."""


def connect(pool_size: int = CONCURRENCY) -> kubernetes.client.ApiClient:
    """(Re)build the API client: in-cluster service account, else $KUBECONFIG / ~/.kube/config."""
    global _client
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    client = kubernetes.client.ApiClient(configuration)
    client.user_agent = USER_AGENT
    with _client_lock:
        old, _client = _client, client
    if old is not None:
        old.close()
    return _client


def disconnect() -> None:
    global _client
    with _client_lock:
        old, _client = _client, None
    if old is not None:
        old.close()


def _objects() -> kubernetes.client.CustomObjectsApi:
    client = _client or connect()
    return kubernetes.client.CustomObjectsApi(client)


def get_job(namespace: str, name: str) -> Obj | None:
    try:
        return _objects().get_namespaced_custom_object(
            JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch_job_status(namespace: str, name: str, patch: Obj, resource_version: str) -> Obj:
    """Merge-patch status, failing with 409 if the job changed since `resource_version`."""
    body = {"metadata": {"resourceVersion": resource_version}, "status": patch}
    return _objects().patch_namespaced_custom_object_status(
        JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name, body, _request_timeout=REQUEST_TIMEOUT
    )


def get_workflow(namespace: str, name: str) -> Obj | None:
    try:
        return _objects().get_namespaced_custom_object(
            WF_GROUP, WF_VERSION, namespace, WF_PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create_workflow(namespace: str, workflow: Obj) -> Obj:
    return _objects().create_namespaced_custom_object(
        WF_GROUP, WF_VERSION, namespace, WF_PLURAL, workflow, _request_timeout=REQUEST_TIMEOUT
    )


def patch_workflow(namespace: str, name: str, patch: Obj) -> Obj:
    return _objects().patch_namespaced_custom_object(
        WF_GROUP, WF_VERSION, namespace, WF_PLURAL, name, patch, _request_timeout=REQUEST_TIMEOUT
    )


def delete_workflow(namespace: str, name: str) -> None:
    try:
        _objects().delete_namespaced_custom_object(
            WF_GROUP,
            WF_VERSION,
            namespace,
            WF_PLURAL,
            name,
            body=kubernetes.client.V1DeleteOptions(propagation_policy="Background"),
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


def service_account_exists(namespace: str, name: str) -> bool:
    client = _client or connect()
    try:
        kubernetes.client.CoreV1Api(client).read_namespaced_service_account(
            name, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def read_secret(namespace: str, name: str) -> dict[str, str]:
    import base64

    client = _client or connect()
    secret = kubernetes.client.CoreV1Api(client).read_namespaced_secret(
        name, namespace, _request_timeout=REQUEST_TIMEOUT
    )
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def retry_after(exc: ApiException, default: float) -> float:
    header = (exc.headers or {}).get("Retry-After") if exc.headers else None
    try:
        return max(float(header), 0.1) if header is not None else default
    except ValueError:
        return default


@contextlib.contextmanager
def retry_on_api_error(what: str) -> Iterator[None]:
    """API failures that may pass (5xx, 429, 409 races, timeouts, a connection lost before
    the answer) -> kopf.TemporaryError.

    429 honours Retry-After. Client errors that will not pass by retrying (403, 422, ...)
    -> kopf.PermanentError with the server's message.
    """
    try:
        yield
    except ApiException as exc:
        if exc.status in (429,) or exc.status >= 500 or exc.status in (409, 0):
            delay = retry_after(exc, 2.0 if exc.status != 429 else 5.0)
            message = f"{what}: HTTP {exc.status} {exc.reason}"
            raise kopf.TemporaryError(message, delay=delay) from None
        raise kopf.PermanentError(f"{what}: HTTP {exc.status} {api_message(exc)}") from None
    except (
        OSError,
        urllib3.exceptions.HTTPError,
        kubernetes.client.exceptions.OpenApiException,
    ) as exc:
        # urllib3's errors (ProtocolError: the connection closed before the answer; read
        # timeouts) are not OSErrors: unconverted, kopf would wait 60 s before retrying
        raise kopf.TemporaryError(f"{what}: {exc}", delay=2.0) from None


def api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
