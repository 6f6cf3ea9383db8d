"""The emulator itself, through the real `kubernetes` client over HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import kubernetes
import pytest
from kube_emulator import label_selector_matches, merge_patch
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.integration

G, V, P = "psft.dev", "v1alpha1", "psftjobs"


@pytest.fixture
def objects(api) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


@pytest.fixture
def core(api) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


def _job(name: str, **spec) -> dict:
    return {"apiVersion": f"{G}/{V}", "kind": "PSFTJob", "metadata": {"name": name}, "spec": spec}


def test_create_assigns_server_fields_and_namespace_from_url(objects):
    created = objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a", x=1))
    meta = created["metadata"]
    assert meta["namespace"] == "ns1"
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1 and int(meta["resourceVersion"]) > 0
    other = objects.create_namespaced_custom_object(G, V, "ns1", P, _job("b"))
    assert other["metadata"]["uid"] != meta["uid"]
    assert int(other["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    with pytest.raises(ApiException) as exc:
        objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a"))
    assert exc.value.status == 409
    assert json.loads(exc.value.body)["reason"] == "AlreadyExists"


def test_generate_name_and_list_kind(objects, core):
    body = {"metadata": {"generateName": "job-"}, "spec": {}}
    first = objects.create_namespaced_custom_object(G, V, "ns1", P, body)
    second = objects.create_namespaced_custom_object(G, V, "ns1", P, body)
    names = {first["metadata"]["name"], second["metadata"]["name"]}
    assert len(names) == 2 and all(n.startswith("job-") and len(n) > 4 for n in names)
    listed = objects.list_namespaced_custom_object(G, V, "ns1", P)
    assert listed["kind"] == "PSFTJobList" and listed["apiVersion"] == f"{G}/{V}"
    assert {i["metadata"]["name"] for i in listed["items"]} == names
    assert int(listed["metadata"]["resourceVersion"]) >= int(second["metadata"]["resourceVersion"])
    assert objects.list_namespaced_custom_object(G, V, "other", P)["items"] == []


def test_namespaces_are_served(core, objects):
    objects.create_namespaced_custom_object(G, V, "team-a", P, _job("a"))
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "team-a"} <= names
    assert core.read_namespace("team-a").status.phase == "Active"


def test_status_subresource_semantics(objects):
    objects.create_namespaced_custom_object(G, V, "ns1", P, {**_job("a", x=1), "status": {"a": 1}})
    job = objects.get_namespaced_custom_object(G, V, "ns1", P, "a")
    assert "status" not in job  # status is ignored on create
    after_status = objects.patch_namespaced_custom_object_status(
        G, V, "ns1", P, "a", {"status": {"phase": "Running"}, "spec": {"x": 99}}
    )
    assert after_status["spec"] == {"x": 1} and after_status["status"] == {"phase": "Running"}
    assert after_status["metadata"]["generation"] == 1  # status writes do not bump generation
    after_spec = objects.patch_namespaced_custom_object(
        G, V, "ns1", P, "a", {"spec": {"x": 2}, "status": {"phase": "Hacked"}}
    )
    assert after_spec["spec"] == {"x": 2} and after_spec["status"] == {"phase": "Running"}
    assert after_spec["metadata"]["generation"] == 2
    labelled = objects.patch_namespaced_custom_object(
        G, V, "ns1", P, "a", {"metadata": {"labels": {"k": "v"}}}
    )
    assert labelled["metadata"]["generation"] == 2  # metadata changes keep the generation


def test_noop_writes_change_nothing(objects):
    created = objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a", x=1))
    same = objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", {"spec": {"x": 1}})
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_optimistic_concurrency(api, objects):
    created = objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a", x=1))
    rv = created["metadata"]["resourceVersion"]
    objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", {"spec": {"x": 2}})
    stale = {"metadata": {"resourceVersion": rv}, "spec": {"x": 3}}
    with pytest.raises(ApiException) as exc:
        objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", stale)
    assert exc.value.status == 409
    # kopf's JSON patch with a `test` of the resourceVersion: 422 when stale
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    json_patch = "application/json-patch+json"
    with pytest.raises(ApiException) as exc:
        objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", ops, _content_type=json_patch)
    assert exc.value.status == 422
    fresh = objects.get_namespaced_custom_object(G, V, "ns1", P, "a")["metadata"]["resourceVersion"]
    ops[0]["value"] = fresh
    patched = objects.patch_namespaced_custom_object(
        G, V, "ns1", P, "a", ops, _content_type=json_patch
    )
    assert patched["metadata"]["finalizers"] == ["x"]


def _watch(objects, **kwargs) -> list[tuple[str, str, str]]:
    stream = kubernetes.watch.Watch().stream(
        objects.list_namespaced_custom_object, G, V, "ns1", P, timeout_seconds=1, **kwargs
    )
    return [
        (e["type"], e["object"]["metadata"]["name"], e["raw_object"]["spec"].get("x"))
        for e in stream
    ]


def test_watch_resumes_from_the_list_resource_version(objects):
    objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a", x=1))
    listed_rv = objects.list_namespaced_custom_object(G, V, "ns1", P)["metadata"]["resourceVersion"]
    # changes between the list and the watch must not be lost
    objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", {"spec": {"x": 2}})
    objects.create_namespaced_custom_object(G, V, "ns1", P, _job("b", x=5))
    objects.delete_namespaced_custom_object(G, V, "ns1", P, "b")
    events = _watch(objects, resource_version=listed_rv)
    assert events == [("MODIFIED", "a", 2), ("ADDED", "b", 5), ("DELETED", "b", 5)]


def test_watch_without_version_starts_with_current_objects_then_follows(objects):
    objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a", x=1))

    def later() -> None:
        time.sleep(0.3)
        objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", {"spec": {"x": 2}})

    thread = threading.Thread(target=later)
    thread.start()
    events = _watch(objects)
    thread.join()
    assert events == [("ADDED", "a", 1), ("MODIFIED", "a", 2)]


def test_watch_initial_events_bookmark_and_expired_versions(emulator, objects):
    objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a", x=1))
    url = f"{emulator.url}/apis/{G}/{V}/namespaces/ns1/{P}?watch=true&timeoutSeconds=1"
    url += "&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
    lines = [json.loads(line) for line in urllib.request.urlopen(url).read().splitlines()]
    assert [e["type"] for e in lines] == ["ADDED", "BOOKMARK"]
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

    emulator.call(setattr, emulator.emulator, "event_log_size", 4)
    for x in range(2, 10):
        objects.patch_namespaced_custom_object(G, V, "ns1", P, "a", {"spec": {"x": x}})
    with pytest.raises(ApiException) as exc:
        _watch(objects, resource_version="1")
    assert exc.value.status == 410


def test_label_and_field_selectors(objects):
    labelled = _job("a")
    labelled["metadata"]["labels"] = {"app": "psft", "tier": "gpu"}
    objects.create_namespaced_custom_object(G, V, "ns1", P, labelled)
    objects.create_namespaced_custom_object(G, V, "ns1", P, _job("b"))

    def names(**kw) -> set[str]:
        items = objects.list_namespaced_custom_object(G, V, "ns1", P, **kw)["items"]
        return {i["metadata"]["name"] for i in items}

    assert names(label_selector="app=psft") == {"a"}
    assert names(label_selector="app!=psft") == {"b"}
    assert names(label_selector="tier in (gpu,cpu),app") == {"a"}
    assert names(label_selector="!app") == {"b"}
    assert names(field_selector="metadata.name=b") == {"b"}
    assert label_selector_matches("a notin (x)", {"a": "y"})
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None}, "d": [1]}) == {
        "a": {"c": 2},
        "d": [1],
    }


def test_finalizers_and_cascading_deletion(objects):
    owner = objects.create_namespaced_custom_object(G, V, "ns1", P, _job("owner"))
    ref = {
        "apiVersion": f"{G}/{V}",
        "kind": "PSFTJob",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    child = {"metadata": {"name": "child", "ownerReferences": [ref]}, "spec": {}}
    objects.create_namespaced_custom_object("argoproj.io", "v1alpha1", "ns1", "workflows", child)
    objects.patch_namespaced_custom_object(
        G, V, "ns1", P, "owner", {"metadata": {"finalizers": ["psft.dev/test"]}}
    )
    objects.delete_namespaced_custom_object(G, V, "ns1", P, "owner")
    marked = objects.get_namespaced_custom_object(G, V, "ns1", P, "owner")
    assert marked["metadata"]["deletionTimestamp"]  # held by the finalizer
    assert objects.get_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "ns1", "workflows", "child"
    )
    objects.patch_namespaced_custom_object(
        G, V, "ns1", P, "owner", {"metadata": {"finalizers": None}}
    )
    for group, version, plural, name in [
        (G, V, P, "owner"),
        ("argoproj.io", "v1alpha1", "workflows", "child"),
    ]:
        with pytest.raises(ApiException) as exc:
            objects.get_namespaced_custom_object(group, version, "ns1", plural, name)
        assert exc.value.status == 404


def test_injected_faults(emulator, objects):
    emulator.fail(500, method="POST", plural=P, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a"))
        assert exc.value.status == 500
    objects.create_namespaced_custom_object(G, V, "ns1", P, _job("a"))

    emulator.fail(429, method="GET", plural=P, name="a", retry_after=1)
    url = f"{emulator.url}/apis/{G}/{V}/namespaces/ns1/{P}/a"
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(url)
    assert http.value.code == 429 and http.value.headers["Retry-After"] == "1"
    assert json.loads(http.value.read())["details"]["retryAfterSeconds"] == 1

    # the kubernetes client (urllib3) waits Retry-After and retries by itself
    fault = emulator.fail(429, method="GET", plural=P, name="a", retry_after=1)
    started = time.monotonic()
    assert objects.get_namespaced_custom_object(G, V, "ns1", P, "a")["metadata"]["name"] == "a"
    assert fault.hits == 1 and time.monotonic() - started >= 1


def test_discovery_of_custom_resources(emulator):
    def get(path: str) -> dict:
        return json.loads(urllib.request.urlopen(emulator.url + path).read())

    groups = {g["name"] for g in get("/apis")["groups"]}
    assert {"psft.dev", "argoproj.io", "kopf.dev", "apiextensions.k8s.io"} <= groups
    resources = {r["name"]: r for r in get(f"/apis/{G}/{V}")["resources"]}
    assert set(resources) == {"psftjobs", "psftjobs/status"}
    assert resources["psftjobs"]["kind"] == "PSFTJob" and resources["psftjobs"]["namespaced"]
    assert {"list", "watch", "patch"} <= set(resources["psftjobs"]["verbs"])
    workflows = {r["name"] for r in get("/apis/argoproj.io/v1alpha1")["resources"]}
    assert workflows == {"workflows"}  # Argo's CRD has no status subresource
