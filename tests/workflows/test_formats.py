"""Values the cluster, the container runtime or S3 would refuse later are refused up front.

Each case is a spec value that a plain `str` field used to accept and that then failed far
from the user: a Pod the API server refuses (`cpu: abc`, a label value of 64 characters, a
toleration without key and operator), an image the kubelet cannot parse, a bucket name the
S3 client refuses in the stage, credentials written into the S3 endpoint. `psft validate`
must name the field and the rule, and the generated CRD must refuse the same value at
`kubectl apply` (checked here with jsonschema and celpy; the same CRD was also applied to a
real kube-apiserver 1.35, which accepted every rule's cost and refused these values alike).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from crd_checks import crd_errors
from workflow_examples import MINIMAL_JOB

from psft.workflows import formats
from psft.workflows.models import context_length_of
from psft.workflows.validate import InvalidJob, validate_job

S3 = {"endpoint": "minio.ml:9000", "bucket": "runs", "secretRef": {"name": "s3-keys"}}


def doc_with(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL_JOB with `value` at the dotted wire path (S3 storage when the path is there)."""
    doc = copy.deepcopy(MINIMAL_JOB)
    if path.startswith("spec.storage.s3"):
        doc["spec"]["storage"] = {"type": "s3", "s3": copy.deepcopy(S3)}
    node = doc
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


def field_errors(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidJob) as info:
        validate_job(doc)
    return {e.path: str(e) for e in info.value.errors}


SHA = "a" * 64
# (wire path, value, the path of the error, words of the rule the message must name)
BAD: list[tuple[str, Any, str, str]] = [
    # metadata: Kubernetes' own object rules (the API server checks them for any object)
    ("metadata.namespace", "My_NS", "metadata.namespace", "DNS-1123 label"),
    ("metadata.namespace", "n" * 64, "metadata.namespace", "is 64 characters long"),
    ("metadata.labels", {"bad key": "v"}, "metadata.labels.bad key", "label key"),
    ("metadata.labels", {"-x": "v"}, "metadata.labels.-x", "label key"),
    ("metadata.labels", {"a" * 254 + "/b": "v"}, "metadata.labels." + "a" * 254 + "/b", "prefix"),
    ("metadata.labels", {"x/" + "n" * 64: "v"}, "metadata.labels.x/" + "n" * 64, "label key"),
    ("metadata.labels", {"a/b/c": "v"}, "metadata.labels.a/b/c", "label key"),
    ("metadata.labels", {"team": "x" * 64}, "metadata.labels.team", "label value"),
    ("metadata.labels", {"team": "-ml"}, "metadata.labels.team", "label value"),
    ("metadata.labels", {"team": "a b"}, "metadata.labels.team", "label value"),
    ("metadata.annotations", {"bad key": "v"}, "metadata.annotations.bad key", "label key"),
    ("metadata.annotations", {"a": "v" * 300_000}, "metadata.annotations", "256 KiB"),
    ("metadata.uid", "../../other-job", "metadata.uid", "UUID"),
    # resource quantities
    ("spec.resources.cpu", "abc", "spec.resources.cpu", "Kubernetes quantity"),
    ("spec.resources.cpu", "8 cores", "spec.resources.cpu", "Kubernetes quantity"),
    ("spec.resources.cpu", "1.5.5", "spec.resources.cpu", "Kubernetes quantity"),
    ("spec.resources.cpu", "1e1.5", "spec.resources.cpu", "Kubernetes quantity"),
    ("spec.resources.cpu", "0", "spec.resources.cpu", "zero or negative"),
    ("spec.resources.memory", "-5Gi", "spec.resources.memory", "zero or negative"),
    ("spec.resources.memory", "64gi", "spec.resources.memory", "Kubernetes quantity"),
    ("spec.resources.memory", "64GB", "spec.resources.memory", "Kubernetes quantity"),
    ("spec.resources.memory", "", "spec.resources.memory", "is empty"),
    ("spec.resources.shmSize", "0.0Mi", "spec.resources.shmSize", "zero or negative"),
    ("spec.resources.shmSize", "1" * 65, "spec.resources.shmSize", "65 characters"),
    # names of other objects, and label values the pods carry
    ("spec.resources.priorityClassName", "High", "spec.resources.priorityClassName", "DNS-1123"),
    ("spec.resources.schedulerName", "my_scheduler", "spec.resources.schedulerName", "DNS-1123"),
    ("spec.resources.serviceAccountName", "trainer.", "spec.resources.serviceAccountName", "DNS"),
    ("spec.resources.queue", "gpu queue", "spec.resources.queue", "label value"),
    ("spec.resources.queue", "", "spec.resources.queue", "is empty"),
    ("spec.storage.s3.secretRef.name", "S3_Keys", "spec.storage.s3.secretRef.name", "DNS-1123"),
    (
        "spec.storage.s3.secretRef.accessKeyKey",
        "..key",
        "spec.storage.s3.secretRef.accessKeyKey",
        "Secret key",
    ),
    (
        "spec.storage.s3.secretRef.secretKeyKey",
        "a/b",
        "spec.storage.s3.secretRef.secretKeyKey",
        "Secret key",
    ),
    # the image
    ("spec.resources.image", "My Image", "spec.resources.image", "image reference"),
    ("spec.resources.image", "trainer:", "spec.resources.image", "image reference"),
    ("spec.resources.image", "Trainer:1.0", "spec.resources.image", "image reference"),
    ("spec.resources.image", "trainer@sha256:abc", "spec.resources.image", "image reference"),
    ("spec.resources.image", "t:" + "x" * 129, "spec.resources.image", "image reference"),
    ("spec.resources.image", "a" * 256 + ":1", "spec.resources.image", "repository name of 256"),
    # node selector and tolerations
    (
        "spec.resources.nodeSelector",
        {"gpu type": "h100"},
        "spec.resources.nodeSelector.gpu type",
        "label key",
    ),
    (
        "spec.resources.nodeSelector",
        {"gpu": "H100 80GB"},
        "spec.resources.nodeSelector.gpu",
        "label value",
    ),
    (
        "spec.resources.nodeSelector",
        {f"k{i}": "v" for i in range(65)},
        "spec.resources.nodeSelector",
        "at most 64",
    ),
    (
        "spec.resources.tolerations",
        [{"key": "nvidia.com gpu", "operator": "Exists"}],
        "spec.resources.tolerations[0].key",
        "label key",
    ),
    (
        "spec.resources.tolerations",
        [{"key": "gpu", "value": "a" * 64}],
        "spec.resources.tolerations[0].value",
        "label value",
    ),
    (
        "spec.resources.tolerations",
        [{"effect": "NoSchedule"}],
        "spec.resources.tolerations[0].operator",
        "must be Exists when key is empty",
    ),
    (
        "spec.resources.tolerations",
        [{"key": "gpu", "operator": "Exists", "value": "yes"}],
        "spec.resources.tolerations[0].value",
        "must be empty when operator is Exists",
    ),
    (
        "spec.resources.tolerations",
        [{"key": "gpu", "tolerationSeconds": 60}],
        "spec.resources.tolerations[0].effect",
        "NoExecute",
    ),
    (
        "spec.resources.tolerations",
        [{"operator": "Exists"}] * 65,
        "spec.resources.tolerations",
        "at most 64",
    ),
    # S3
    ("spec.storage.s3.bucket", "10.0.0.1", "spec.storage.s3.bucket", "IP address"),
    ("spec.storage.s3.bucket", "my..bucket", "spec.storage.s3.bucket", "S3 bucket name"),
    ("spec.storage.s3.bucket", "my.-bucket", "spec.storage.s3.bucket", "S3 bucket name"),
    ("spec.storage.s3.bucket", "My-Bucket", "spec.storage.s3.bucket", "S3 bucket name"),
    ("spec.storage.s3.bucket", "my_bucket", "spec.storage.s3.bucket", "S3 bucket name"),
    ("spec.storage.s3.bucket", "-bucket", "spec.storage.s3.bucket", "S3 bucket name"),
    ("spec.storage.s3.bucket", "ab", "spec.storage.s3.bucket", "3 to 63"),
    (
        "spec.storage.s3.endpoint",
        "http://user:pass@minio:9000",
        "spec.storage.s3.endpoint",
        "secretRef",
    ),
    (
        "spec.storage.s3.endpoint",
        "AKIA:secret@minio:9000",
        "spec.storage.s3.endpoint",
        "must not hold credentials",
    ),
    ("spec.storage.s3.endpoint", "minio:9000/bucket", "spec.storage.s3.endpoint", "without a path"),
    ("spec.storage.s3.endpoint", "minio:9000?region=x", "spec.storage.s3.endpoint", "query"),
    ("spec.storage.s3.endpoint", "ftp://minio:21", "spec.storage.s3.endpoint", "scheme 'ftp'"),
    ("spec.storage.s3.endpoint", "minio:0", "spec.storage.s3.endpoint", "host:port"),
    ("spec.storage.s3.endpoint", "minio:70000", "spec.storage.s3.endpoint", "host:port"),
    ("spec.storage.s3.endpoint", "mini o:9000", "spec.storage.s3.endpoint", "host:port"),
    ("spec.storage.s3.region", "us east 1", "spec.storage.s3.region", "region"),
    ("spec.storage.s3.region", "-us", "spec.storage.s3.region", "region"),
    ("spec.storage.s3.prefix", "team/../other-team", "spec.storage.s3.prefix", "'..' segment"),
    ("spec.storage.s3.prefix", "..", "spec.storage.s3.prefix", "'..' segment"),
    ("spec.storage.s3.prefix", "./runs", "spec.storage.s3.prefix", "'..' segment"),
    ("spec.storage.s3.prefix", "p" * 513, "spec.storage.s3.prefix", "513 characters"),
    (
        "spec.monitoring.pushgateway",
        "http://admin:pw@gw:9091",
        "spec.monitoring.pushgateway",
        "must not hold credentials",
    ),
    ("spec.monitoring.pushgateway", "gw :9091", "spec.monitoring.pushgateway", "Pushgateway"),
    ("spec.monitoring.pushgateway", "ftp://gw", "spec.monitoring.pushgateway", "Pushgateway"),
]

GOOD: list[tuple[str, Any]] = [
    ("metadata.namespace", "ml-team-1"),
    ("metadata.labels", {"app.kubernetes.io/part-of": "psft", "empty": "", "A_b.c": "X-1_y.z"}),
    ("metadata.annotations", {"kubectl.kubernetes.io/last-applied-configuration": "{}"}),
    ("metadata.uid", "0b5e7a52-4a4c-4bd5-9c2a-2e8f0f1b9a10"),
    ("spec.resources.cpu", "500m"),
    ("spec.resources.cpu", "1.5"),
    ("spec.resources.cpu", "+2"),
    ("spec.resources.cpu", ".5"),
    ("spec.resources.memory", "1.5e9"),
    ("spec.resources.memory", "128974848"),
    ("spec.resources.memory", "129M"),
    ("spec.resources.shmSize", "1Ei"),
    ("spec.resources.priorityClassName", "training-high"),
    ("spec.resources.schedulerName", "volcano"),
    ("spec.resources.serviceAccountName", "trainer.ml"),
    ("spec.resources.queue", "gpu_training.v1"),
    ("spec.resources.image", "busybox"),
    ("spec.resources.image", "docker.io/library/python:3.11-slim"),
    ("spec.resources.image", f"localhost:5000/team/psft-trainer@sha256:{SHA}"),
    ("spec.resources.image", f"registry.example.com/a__b/c-d:v1.0_rc-1@sha256:{SHA}"),
    ("spec.resources.image", "[::1]:5000/trainer:dev"),
    ("spec.resources.nodeSelector", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "e": ""}),
    ("spec.resources.tolerations", [{"operator": "Exists"}]),
    ("spec.resources.tolerations", [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]),
    (
        "spec.resources.tolerations",
        [{"key": "gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}],
    ),
    ("spec.storage.s3.bucket", "my.bucket-1"),
    ("spec.storage.s3.bucket", "abc"),
    ("spec.storage.s3.endpoint", "https://s3.eu-west-1.amazonaws.com"),
    ("spec.storage.s3.endpoint", "http://minio:9000/"),
    ("spec.storage.s3.endpoint", "10.0.0.1:9000"),
    ("spec.storage.s3.endpoint", "[::1]:9000"),
    ("spec.storage.s3.endpoint", "seaweed_s3:8333"),
    ("spec.storage.s3.region", "eu-west-1"),
    ("spec.storage.s3.region", ""),
    ("spec.storage.s3.prefix", ""),
    ("spec.storage.s3.prefix", "/team/a/"),
    ("spec.storage.s3.prefix", "runs..old/v1"),
    ("spec.storage.s3.secretRef.accessKeyKey", ".access_key-1"),
    ("spec.monitoring.pushgateway", "http://prometheus-pushgateway.monitoring.svc:9091"),
    ("spec.monitoring.pushgateway", "gw:9091"),
]


def _id(case: tuple[Any, ...]) -> str:
    return f"{case[0]}={str(case[1])[:30]}"


@pytest.mark.parametrize(("path", "value", "where", "words"), BAD, ids=[_id(c) for c in BAD])
def test_psft_validate_names_the_field_and_the_rule(
    path: str, value: Any, where: str, words: str
) -> None:
    errors = field_errors(doc_with(path, value))
    assert where in errors, errors
    message = errors[where]
    assert words in message, message
    assert len(message) < 1000  # a huge value is shown cut short


@pytest.mark.parametrize(("path", "value"), GOOD, ids=[_id(c) for c in GOOD])
def test_values_kubernetes_and_s3_accept_pass(path: str, value: Any, openapi) -> None:
    doc = doc_with(path, value)
    validate_job(doc)
    if path.startswith("spec."):
        assert crd_errors(doc, openapi) == []


CRD_BAD = [c for c in BAD if c[0].startswith("spec.")]
"""metadata is checked by the API server itself (a CRD may restrict only metadata.name)."""


@pytest.mark.parametrize(
    ("path", "value", "where", "words"), CRD_BAD, ids=[_id(c) for c in CRD_BAD]
)
def test_the_crd_refuses_the_same_values(
    path: str, value: Any, where: str, words: str, openapi
) -> None:
    errors = crd_errors(doc_with(path, value), openapi)
    assert errors, f"the CRD admits {path}={value!r}"


def test_credentials_in_the_endpoint_are_refused_with_the_fix() -> None:
    errors = field_errors(doc_with("spec.storage.s3.endpoint", "http://AKIA123:s3cr3t@minio:9000"))
    message = errors["spec.storage.s3.endpoint"]
    assert "must not hold credentials" in message
    assert "Kubernetes Secret" in message and "spec.storage.s3.secretRef" in message


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("s3://Bad_Bucket/train.jsonl", "S3 bucket name"),
        ("s3://b/train.jsonl", "is 1 characters long"),
        ("s3://10.1.2.3/train.jsonl", "IP address"),
        ("s3://data/../../etc/passwd", "'..' segment"),
        ("s3://data/a/./b.jsonl", "'..' segment"),
        ("s3://data/a\nb.jsonl", "control character"),
        ("s3://data/\ud800.jsonl", "UTF-8"),
        ("s3://data/" + "k" * 1025, "1025 bytes"),
    ],
)
def test_s3_uris_in_path_fields_follow_s3s_rules(uri: str, words: str) -> None:
    doc = copy.deepcopy(MINIMAL_JOB)
    doc["spec"]["dataset"]["train"] = [uri]
    errors = field_errors(doc)
    assert words in errors["spec.dataset.train[0]"], errors


def test_every_format_pattern_is_the_same_in_go_and_python() -> None:
    """No look-around, `\\d`, `\\w` or POSIX classes: RE2 (the API server, CEL `matches`) and
    Python's `re` must read each pattern alike."""
    patterns = [f.schema_pattern for f in vars(formats).values() if isinstance(f, formats.Format)]
    patterns += [v for k, v in vars(formats).items() if k.isupper() and isinstance(v, str)]
    for pattern in filter(None, patterns):
        for construct in ("(?=", "(?!", "(?<", "\\d", "\\w", "\\s", "[[:"):
            assert construct not in pattern, (construct, pattern)


def test_a_broken_model_config_is_no_traceback(tmp_path: Path) -> None:
    """A local model folder whose config.json is no JSON object, not UTF-8 or holds a
    nonsense length: validation learns nothing from it instead of raising."""
    for content in (
        b"[1, 2]",
        b"\xff\xfe",
        b'{"max_position_embeddings": true}',
        b"1" * 5000,
        b'{"max_position_embeddings": -1}',
        b"[" * 100_000,
    ):
        (tmp_path / "config.json").write_bytes(content)
        assert context_length_of(str(tmp_path)) is None
    doc = copy.deepcopy(MINIMAL_JOB)
    doc["spec"]["model"]["source"] = str(tmp_path)
    validate_job(doc)
