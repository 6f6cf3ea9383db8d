"""A Kubernetes API emulator for operator tests: kmock's server with API-server semantics.

kmock 0.8 (`kmock.KubernetesEmulator`) serves discovery and stores objects, but misses what
kopf relies on: resourceVersion/uid/creationTimestamp/generation, watches resumable from a
resourceVersion (events between the initial list and the watch are otherwise lost), the
namespace taken from the URL, `/api/v1/namespaces`, generateName, the status subresource
(a status write must not change spec and a spec write must not change status), `kind` on
lists, JSON-patch `test` operations, finalizers, and garbage collection through
ownerReferences. `KubeEmulator` keeps kmock's HTTP server, request parsing, request log and
discovery documents, and replaces the object store with one that has those semantics.

`EmulatorThread` runs it on 127.0.0.1 in a background event loop so that synchronous tests,
the `kubernetes` client and an operator in another thread can all talk to it over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import copy
import datetime
import json
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import apps, enums, rendering

Obj = dict[str, Any]
Key = tuple[str, str | None, str]  # (group/version/plural, namespace, name)

PSFT_RESOURCES: dict[str, dict[str, Any]] = {
    "psft.dev/v1alpha1/psftjobs": dict(
        kind="PSFTJob",
        singular="psftjob",
        namespaced=True,
        shortnames={"psft"},
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    ),
    # Argo's Workflow CRD declares no status subresource: its controller writes the whole object
    "argoproj.io/v1alpha1/workflows": dict(
        kind="Workflow",
        singular="workflow",
        namespaced=True,
        shortnames={"wf"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    ),
    "kopf.dev/v1/kopfpeerings": dict(
        kind="KopfPeering",
        singular="kopfpeering",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    ),
    "kopf.dev/v1/clusterkopfpeerings": dict(
        kind="ClusterKopfPeering",
        singular="clusterkopfpeering",
        namespaced=False,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    ),
}

_NAMESPACES_PATH = re.compile(
    r"^/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?$"
)
_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None, **details: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details
        self.headers: dict[str, str] = {}

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


@dataclass
class Fault:
    """An injected API error: the next `times` requests that match answer `code`."""

    code: int
    method: str | None = None
    plural: str | None = None
    subresource: str | None = None
    name: str | None = None
    watch: bool | None = None
    times: int = 1
    retry_after: int | None = None
    agent: str | None = None
    """Only requests whose User-Agent starts with this (e.g. `kopf/`)."""
    hits: int = 0

    def matches(self, request: rendering.Request) -> bool:
        is_watch = request.params.get("watch") in ("true", "1")
        return (
            self.hits < self.times
            and (self.method is None or request.method.value == self.method.upper())
            and (
                self.plural is None or (request.resource and request.resource.plural == self.plural)
            )
            and (self.subresource is None or request.subresource == self.subresource)
            and (self.name is None or request.name == self.name)
            and (self.watch is None or self.watch == is_watch)
            and (self.agent is None or request.headers.get("User-Agent", "").startswith(self.agent))
        )


@dataclass(frozen=True)
class ResourceType:
    key: str
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class _Event:
    rv: int
    key: Key
    type: str
    obj: Obj
    labels: dict[str, str] = field(default_factory=dict)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def label_selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Kubernetes label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`."""
    for term in _split_selector(selector or ""):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str | None, obj: Obj) -> bool:
    for term in _split_selector(selector or ""):
        negate = "!=" in term
        path, value = (s.strip() for s in re.split(r"!=|==|=", term, maxsplit=1))
        actual: Any = obj
        for part in path.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if (str(actual) == value) == negate:
            return False
    return True


def _encode_string_data(rt: ResourceType, obj: Obj) -> None:
    """Secrets: the API server stores `stringData` base64-encoded into `data`."""
    if rt.key == "v1/secrets" and isinstance(obj.get("stringData"), dict):
        encoded = {
            k: base64.b64encode(str(v).encode()).decode() for k, v in obj["stringData"].items()
        }
        obj["data"] = {**(obj.get("data") or {}), **encoded}
        del obj["stringData"]


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the API-server semantics kopf needs (module docstring).

    Test helpers (call them on the emulator's event loop, e.g. through `EmulatorThread.call`):
    `fail()` injects errors, `get()`/`list()` read stored objects, `put_object()` stores one.
    """

    event_log_size = 20000

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._store: dict[Key, Obj] = {}
        self._rv = 0
        self._log: list[_Event] = []
        self._log_rvs: list[int] = []
        self._oldest_rv = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self.faults: list[Fault] = []
        self.resources.load_bundled()
        for key, info in PSFT_RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(**info)
        self._create_namespace("default")

    # ----------------------------------------------------------------- request routing
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser fails on `/api/v1/namespaces[/name]` (namespaces are the one
        # cluster-scoped resource whose plural is also the namespace prefix): route it here.
        match = _NAMESPACES_PATH.match(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        await raw_request.read()
        try:
            data = await raw_request.json()
        except ValueError:
            data = None
        method = enums.method(raw_request.method)
        params = dict(raw_request.query)
        name = match["name"]
        request = rendering.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=params,
            headers=dict(raw_request.headers),
            data=data,
            action=enums.action(
                "WATCH"
                if params.get("watch") == "true"
                else {"GET": "FETCH" if name else "LIST", "POST": "CREATE", "PATCH": "UPDATE"}.get(
                    method.value, "DELETE"
                )
            ),
            resource=kmock.resource("", "v1", "namespaces"),
            name=name,
            subresource=match["sub"],
        )
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as exc:  # same contract as kmock: errors go back to the client
            return await self._render_error(exc)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        try:
            for fault in self.faults:
                if fault.matches(request):
                    fault.hits += 1
                    error = ApiError(fault.code, f"injected fault {fault.code} for testing")
                    if fault.retry_after is not None:
                        error.headers["Retry-After"] = str(fault.retry_after)
                        error.details["retryAfterSeconds"] = fault.retry_after
                    raise error
            res = request.resource
            if res is None or not res.plural:
                # discovery documents and non-Kubernetes paths: kmock's scaffold serves them
                return await apps.RawHandler._handle(self, request)
            rtype = self._resource_type(res)
            return await self._serve(request, rtype)
        except ApiError as exc:
            return aiohttp.web.json_response(exc.status(), status=exc.code, headers=exc.headers)

    def _resource_type(self, res: kmock.resource) -> ResourceType:
        if res not in self.resources:
            raise ApiError(404, f"the server could not find the requested resource ({res})")
        info = self.resources[res]
        return ResourceType(
            key=f"{res.group}/{res.version}/{res.plural}"
            if res.group
            else f"{res.version}/{res.plural}",
            group=res.group or "",
            version=res.version or "",
            plural=res.plural or "",
            kind=info.kind or (res.plural or "").capitalize(),
            namespaced=bool(info.namespaced),
            status_subresource="status" in info.subresources,
        )

    async def _serve(
        self, request: rendering.Request, rt: ResourceType
    ) -> aiohttp.web.StreamResponse:
        method = request.method.value
        ns = request.namespace if rt.namespaced else None
        if request.params.get("watch") in ("true", "1"):
            return await self._watch(request, rt, ns)
        if request.name is None:
            if method == "GET":
                return self._json(self._list(rt, ns, request.params))
            if method == "POST":
                return self._json(self.create(rt, ns, request.data), 201)
            raise ApiError(405, f"{method} is not supported on a collection here")
        key = (rt.key, ns, request.name)
        sub = request.subresource
        if sub not in (None, "status"):
            raise ApiError(404, f"subresource {sub!r} is not served by the emulator")
        if sub == "status" and not rt.status_subresource and rt.plural != "namespaces":
            raise ApiError(404, f"{rt.plural} has no status subresource")
        if method == "GET":
            return self._json(self._get_or_404(rt, key))
        if method == "PATCH":
            ctype = request.headers.get("Content-Type", "application/merge-patch+json")
            return self._json(self.patch(rt, key, request.data, ctype, subresource=sub))
        if method == "PUT":
            return self._json(self.replace(rt, key, request.data, subresource=sub))
        if method == "DELETE":
            options = dict(request.data or {}) if isinstance(request.data, dict) else {}
            policy = request.params.get("propagationPolicy") or options.get("propagationPolicy")
            return self._json(self.delete(rt, key, orphan=policy == "Orphan"))
        raise ApiError(405, f"{method} is not supported")

    @staticmethod
    def _json(obj: Obj, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(obj, status=status)

    # ----------------------------------------------------------------- object store
    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, etype: str, key: Key, obj: Obj) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self._log.append(_Event(rv, key, etype, obj))
        self._log_rvs.append(rv)
        if len(self._log) > self.event_log_size:
            cut = len(self._log) // 2
            self._oldest_rv = self._log_rvs[cut - 1]
            del self._log[:cut], self._log_rvs[:cut]
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _get_or_404(self, rt: ResourceType, key: Key) -> Obj:
        obj = self._store.get(key)
        if obj is None:
            raise ApiError(
                404, f'{rt.plural} "{key[2]}" not found', "NotFound", name=key[2], kind=rt.plural
            )
        return obj

    def _create_namespace(self, name: str) -> None:
        key = ("v1/namespaces", None, name)
        if key not in self._store:
            obj = {"metadata": {"name": name}, "spec": {"finalizers": ["kubernetes"]}}
            obj["status"] = {"phase": "Active"}
            self._insert(self._resource_type(kmock.resource("", "v1", "namespaces")), key, obj)

    def _insert(self, rt: ResourceType, key: Key, obj: Obj) -> Obj:
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta["resourceVersion"] = self._bump()
        meta.pop("deletionTimestamp", None)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        self._store[key] = obj
        self._emit("ADDED", key, obj)
        return obj

    def create(self, rt: ResourceType, namespace: str | None, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise ApiError(400, "the namespace of the object does not match the URL")
            namespace = namespace or body_ns or "default"
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "metadata.name or metadata.generateName is required")
            for _ in range(100):
                name = meta["generateName"] + secrets.token_hex(3)[:5]
                if (rt.key, namespace, name) not in self._store:
                    break
            meta["name"] = name
        key = (rt.key, namespace, meta["name"])
        if key in self._store:
            raise ApiError(
                409,
                f'{rt.plural} "{meta["name"]}" already exists',
                "AlreadyExists",
                name=meta["name"],
                kind=rt.plural,
            )
        if rt.status_subresource:
            obj.pop("status", None)  # status is written only through the subresource
        _encode_string_data(rt, obj)
        if namespace is not None:
            self._create_namespace(namespace)
        return self._insert(rt, key, obj)

    def patch(
        self,
        rt: ResourceType,
        key: Key,
        patch: Any,
        content_type: str,
        subresource: str | None = None,
    ) -> Obj:
        current = self._get_or_404(rt, key)
        ctype = content_type.split(";")[0].strip()
        if ctype == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(current, patch)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise ApiError(422, f"the JSON patch test failed: {exc}") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, f"the JSON patch cannot be applied: {exc}") from None
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            # strategic merge is served as a JSON merge patch (lists are replaced whole)
            if not isinstance(patch, dict):
                raise ApiError(400, "a merge patch must be a JSON object")
            self._check_precondition(rt, current, patch)
            new = merge_patch(current, patch)
        else:
            raise ApiError(415, f"unsupported patch content type {ctype!r}")
        return self._update(rt, key, new, subresource)

    def replace(self, rt: ResourceType, key: Key, body: Any, subresource: str | None = None) -> Obj:
        current = self._get_or_404(rt, key)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self._check_precondition(rt, current, body)
        return self._update(rt, key, copy.deepcopy(body), subresource)

    @staticmethod
    def _check_precondition(rt: ResourceType, current: Obj, body: Obj) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f"Operation cannot be fulfilled on {rt.plural} "
                f'"{current["metadata"]["name"]}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )

    def _update(self, rt: ResourceType, key: Key, new: Obj, subresource: str | None) -> Obj:
        current = self._store[key]
        if subresource == "status":
            candidate = copy.deepcopy(current)
            if "status" in new:
                candidate["status"] = new["status"]
            else:
                candidate.pop("status", None)
        else:
            candidate = copy.deepcopy(new)
            if rt.status_subresource:  # the main resource ignores status changes
                if "status" in current:
                    candidate["status"] = copy.deepcopy(current["status"])
                else:
                    candidate.pop("status", None)
        _encode_string_data(rt, candidate)
        meta = candidate.setdefault("metadata", {})
        old_meta = current["metadata"]
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "generation"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if old_meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
        elif meta.get("deletionTimestamp"):
            meta.pop("deletionTimestamp")  # only DELETE sets it
        meta["resourceVersion"] = old_meta["resourceVersion"]
        candidate["apiVersion"], candidate["kind"] = rt.api_version, rt.kind
        if candidate == current:
            return current  # no-op writes bump nothing and send no event, as in Kubernetes
        if self._spec_of(rt, candidate) != self._spec_of(rt, current):
            meta["generation"] = old_meta.get("generation", 1) + 1
        meta["resourceVersion"] = self._bump()
        self._store[key] = candidate
        self._emit("MODIFIED", key, candidate)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key)
        return candidate

    @staticmethod
    def _spec_of(rt: ResourceType, obj: Obj) -> Obj:
        skip = {"metadata", "status"} if rt.status_subresource else {"metadata"}
        return {k: v for k, v in obj.items() if k not in skip}

    def delete(self, rt: ResourceType, key: Key, orphan: bool = False) -> Obj:
        current = self._get_or_404(rt, key)
        meta = current["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = _now()
                marked["metadata"]["resourceVersion"] = self._bump()
                self._store[key] = marked
                self._emit("MODIFIED", key, marked)
                return marked
            return current
        return self._remove(key, orphan=orphan)

    def _remove(self, key: Key, orphan: bool = False) -> Obj:
        obj = copy.deepcopy(self._store.pop(key))
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit("DELETED", key, obj)
        if not orphan:
            self._collect_garbage(obj["metadata"]["uid"])
        return obj

    def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion: dependents whose owners are all gone are deleted."""
        live_uids = {o["metadata"]["uid"] for o in self._store.values()}
        for key, obj in list(self._store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            owned = any(r.get("uid") == owner_uid for r in refs)
            orphaned = not any(r.get("uid") in live_uids for r in refs)
            if owned and orphaned and key in self._store:
                self.delete(self._resource_type(kmock.resource(key[0])), key)

    # ----------------------------------------------------------------- list & watch
    def _matching(self, rt: ResourceType, ns: str | None, params: dict[str, str]) -> list[Obj]:
        return [
            obj
            for (rkey, ons, _), obj in self._store.items()
            if rkey == rt.key
            and (ns is None or ons == ns)
            and label_selector_matches(
                params.get("labelSelector"), obj["metadata"].get("labels") or {}
            )
            and field_selector_matches(params.get("fieldSelector"), obj)
        ]

    def _list(self, rt: ResourceType, ns: str | None, params: dict[str, str]) -> Obj:
        items = sorted(
            self._matching(rt, ns, params),
            key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]),
        )
        return {
            "apiVersion": rt.api_version,
            "kind": f"{rt.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _event_matches(
        self, ev: _Event, rt: ResourceType, ns: str | None, params: dict[str, str]
    ) -> bool:
        return (
            ev.key[0] == rt.key
            and (ns is None or ev.key[1] == ns)
            and label_selector_matches(
                params.get("labelSelector"), ev.obj["metadata"].get("labels") or {}
            )
            and field_selector_matches(params.get("fieldSelector"), ev.obj)
        )

    async def _watch(
        self, request: rendering.Request, rt: ResourceType, ns: str | None
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        raw = request._raw_request
        assert raw is not None
        since_param = params.get("resourceVersion")
        initial = params.get("sendInitialEvents") == "true" or since_param in (None, "", "0")
        if not initial and since_param is not None and not since_param.isdigit():
            raise ApiError(400, f"invalid resourceVersion {since_param!r}")
        if not initial and int(since_param or 0) < self._oldest_rv:
            raise ApiError(
                410, f"too old resource version: {since_param} ({self._oldest_rv})", "Expired"
            )
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)

        async def send(event: Obj) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        if initial:
            since = self._rv
            for obj in self._matching(rt, ns, params):
                await send({"type": "ADDED", "object": obj})
            if (
                params.get("sendInitialEvents") == "true"
                and params.get("allowWatchBookmarks") == "true"
            ):
                annotations = {"k8s.io/initial-events-end": "true"}
                meta = {"resourceVersion": str(since), "annotations": annotations}
                await send(
                    {
                        "type": "BOOKMARK",
                        "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta},
                    }
                )
        else:
            since = int(since_param or 0)
        timeout = float(params.get("timeoutSeconds") or 3600)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not self._closing and loop.time() < deadline:
                wakeup = self._wakeup
                start = bisect.bisect_right(self._log_rvs, since)
                if self._log and since < self._oldest_rv:
                    gone = ApiError(410, "too old resource version", "Expired").status()
                    await send({"type": "ERROR", "object": gone})
                    break
                for ev in self._log[start:]:
                    if self._event_matches(ev, rt, ns, params):
                        await send({"type": ev.type, "object": ev.obj})
                    since = ev.rv
                if raw.transport is None or raw.transport.is_closing():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        wakeup.wait(), timeout=min(1.0, max(0.0, deadline - loop.time()))
                    )
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass  # the client went away
        return response

    async def __aexit__(self, *exc: Any) -> None:
        self._closing = True
        self._wakeup.set()
        await super().__aexit__(*exc)

    # ----------------------------------------------------------------- test helpers
    def fail(
        self,
        code: int,
        *,
        method: str | None = None,
        plural: str | None = None,
        subresource: str | None = None,
        name: str | None = None,
        watch: bool | None = None,
        times: int = 1,
        retry_after: int | None = None,
        agent: str | None = None,
    ) -> Fault:
        """Answer the next `times` matching requests with HTTP `code` (429: with Retry-After)."""
        fault = Fault(code, method, plural, subresource, name, watch, times, retry_after, agent)
        self.faults.append(fault)
        return fault

    def create_namespace(self, name: str) -> None:
        self._create_namespace(name)

    def list(self, resource: str, namespace: str | None = None) -> list[Obj]:
        rt = self._resource_type(kmock.resource(resource))
        return copy.deepcopy(self._matching(rt, namespace, {}))

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        rt = self._resource_type(kmock.resource(resource))
        obj = self._store.get((rt.key, namespace if rt.namespaced else None, name))
        return copy.deepcopy(obj)

    def put_object(self, resource: str, obj: Obj) -> Obj:
        """Create an object as a client would (uid, resourceVersion, ... are assigned)."""
        rt = self._resource_type(kmock.resource(resource))
        return copy.deepcopy(self.create(rt, obj.get("metadata", {}).get("namespace"), obj))

    def requests_where(
        self, predicate: Callable[[rendering.Request], bool]
    ) -> list[rendering.Request]:
        return [r for r in self._requests if predicate(r)]


class EmulatorThread:
    """Runs a `KubeEmulator` on 127.0.0.1 (free port) in a background thread's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator: KubeEmulator | None = None
        self._server: kmock.Server | None = None
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="kube-emulator", daemon=True
        )

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._run(self._start())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        self.emulator = KubeEmulator()
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()

    async def _stop(self) -> None:
        assert self.emulator is not None and self._server is not None
        self.emulator._closing = True
        self.emulator._wakeup.set()
        await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.url).rstrip("/")

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on the emulator's loop (its store is not thread-safe)."""

        async def run() -> Any:
            return fn(*args, **kwargs)

        return self._run(run())

    def fail(self, code: int, **kwargs: Any) -> Fault:
        assert self.emulator is not None
        return self.call(self.emulator.fail, code, **kwargs)

    def create_namespace(self, name: str) -> None:
        assert self.emulator is not None
        self.call(self.emulator.create_namespace, name)

    def list(self, resource: str, namespace: str | None = None) -> list[Obj]:
        assert self.emulator is not None
        return self.call(self.emulator.list, resource, namespace)

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        assert self.emulator is not None
        return self.call(self.emulator.get, resource, namespace, name)

    def put_object(self, resource: str, obj: Obj) -> Obj:
        assert self.emulator is not None
        return self.call(self.emulator.put_object, resource, obj)

    def requests_where(
        self, predicate: Callable[[rendering.Request], bool]
    ) -> list[rendering.Request]:
        assert self.emulator is not None
        return self.call(self.emulator.requests_where, predicate)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this emulator (no auth: the emulator checks none)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}
            ],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
        }
        path.write_text(json.dumps(config))
        return path


def events_of(items: Iterable[Obj], name: str) -> list[Obj]:
    """Core/v1 Events about the object called `name`, oldest first."""
    return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]
