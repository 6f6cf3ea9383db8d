"""The chart with the real helm 4.3: lint, render, validate every manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_helpers import ALL_ON, CHART, NAMESPACE, RELEASE, Render, by_kind, one
from k8s_tools import isolated_env, run_tool, tool_path

from psft.workflows.crd import to_json_schema

K8S_VERSION = "1.37.0"
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
CUSTOM_GROUPS = ("monitoring.coreos.com/", "kopf.dev/", "psft.dev/")


def chart_crds() -> list[dict[str, Any]]:
    """The CRDs in charts/psft/crds/, which helm installs before any template."""
    return [
        d
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]


def validate_manifests(docs: list[dict[str, Any]]) -> None:
    """Built-in objects against Kubernetes' own schema (unknown fields rejected); custom
    objects whose CRD the chart ships (crds/) against that CRD's openAPIV3Schema."""
    schemas = {
        (f"{c['spec']['group']}/{v['name']}", c["spec"]["names"]["kind"]): v["schema"][
            "openAPIV3Schema"
        ]
        for c in chart_crds()
        for v in c["spec"]["versions"]
    }
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            schema = schemas.get((doc["apiVersion"], doc["kind"]))
            if schema is not None:
                # metadata is checked as ObjectMeta by the apiserver, not by the CRD schema
                bare = {**doc, "metadata": {"name": doc["metadata"]["name"]}}
                jsonschema.validate(bare, to_json_schema(schema))
            else:
                assert doc["kind"] in PROMETHEUS_OPERATOR_KINDS, f"{where}: no CRD"
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {exc}") from None


def test_lint_strict_defaults_and_all_flags(chart_dir: Path, tmp_path: Path) -> None:
    run_tool("helm", "lint", "--strict", str(chart_dir))
    values = tmp_path / "all-on.yaml"
    values.write_text(yaml.safe_dump(ALL_ON))
    run_tool("helm", "lint", "--strict", str(chart_dir), "--values", str(values))


def offline_helm(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """helm with an empty home (no repositories, no cached charts) and unreachable proxies,
    so that anything it tried to download would fail: an air-gapped machine."""
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    env = isolated_env(home) | {
        name: dead for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    }
    return subprocess.run(
        [str(tool_path("helm")), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_fresh_checkout_lints_renders_and_installs_offline(tmp_path: Path) -> None:
    """The README's `helm install psft charts/psft -n psft-system --create-namespace` from a
    fresh clone: no charts/ folder, no `helm dependency update`, no network. Helm refuses a
    chart whose declared dependencies are missing from charts/, even with their condition
    false, so this fails as soon as Chart.yaml declares any."""
    chart = tmp_path / "checkout" / "charts" / "psft"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("charts", "Chart.lock", "*.tgz"))
    home = tmp_path / "home"
    commands = {
        "lint": ("lint", "--strict", str(chart)),
        "template": ("template", RELEASE, str(chart), "--namespace", NAMESPACE),
        "install": (
            "install", RELEASE, str(chart), "-n", NAMESPACE, "--create-namespace",
            "--dry-run=client",
        ),
    }  # fmt: skip
    out = {}
    for name, args in commands.items():
        proc = offline_helm(home, *args)
        assert proc.returncode == 0, f"helm {name}: {proc.stdout}\n{proc.stderr}"
        out[name] = proc.stdout
    assert not (chart / "charts").exists(), "helm must not have fetched anything"
    assert "dependencies" not in yaml.safe_load((chart / "Chart.yaml").read_text())
    docs = [d for d in yaml.safe_load_all(out["template"]) if d]
    assert one(docs, "Deployment", "operator")["metadata"]["namespace"] == NAMESPACE
    assert "STATUS: pending-install" in out["install"] and "NOTES:" in out["install"]


def test_defaults_render_a_hardened_operator(helm_template: Render) -> None:
    docs = helm_template()
    validate_manifests(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert not PROMETHEUS_OPERATOR_KINDS & set(kinds), "monitoring CRs must be opt-in"
    assert "ConfigMap" not in kinds, "no dashboards by default"

    deploy = one(docs, "Deployment", "operator")
    assert deploy["metadata"]["namespace"] == NAMESPACE
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}, "never two operators at once"
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["image"] == "ghcr.io/psft-dev/psft-operator:0.1.0"
    assert container["args"][0] == "operator"
    assert "--all-namespaces" in container["args"]
    assert "--peering=psft-operator" in container["args"]
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "psft-operator"
    assert not by_kind(docs, "PodDisruptionBudget"), "a PDB of one replica blocks drains"

    service = one(docs, "Service", "metrics")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] == "metrics" and "metrics" in ports

    workflow_sa = [
        d for d in by_kind(docs, "ServiceAccount") if "workflow" in d["metadata"]["name"]
    ]
    assert [d["metadata"]["namespace"] for d in workflow_sa] == [NAMESPACE]
    role = one(docs, "Role", "workflow")
    assert role["rules"] == [
        {
            "apiGroups": ["argoproj.io"],
            "resources": ["workflowtaskresults"],
            "verbs": ["create", "patch"],
        }
    ]


def test_every_flag_on_renders_valid_manifests(helm_template: Render) -> None:
    docs = helm_template(ALL_ON)
    validate_manifests(docs)
    kinds = {d["kind"] for d in docs}
    assert kinds >= PROMETHEUS_OPERATOR_KINDS | {"ConfigMap", "Role", "RoleBinding"}

    deploy = one(docs, "Deployment", "operator")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/psft-dev/psft-operator@sha256:" + "0" * 64
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    assert "--all-namespaces" not in container["args"]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    spread = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    peerings = by_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    for doc in docs:
        assert doc["metadata"]["labels"]["cost-center"] == "research"

    # operator: a Role per watched namespace, no cluster-wide access to namespaced objects
    roles = [d for d in by_kind(docs, "Role") if d["metadata"]["name"].endswith("-operator")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert [d["metadata"]["name"] for d in by_kind(docs, "ClusterRole")] == [
        "psft-operator-cluster"
    ]

    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pods = one(docs, "PodMonitor")
    assert pods["spec"]["namespaceSelector"]["matchNames"] == ["team-a", "team-b"]
    assert pods["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True

    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"PSFTEntropyCollapse", "PSFTJobStuck", "PSFTJobFailed"}
    assert all(a["labels"]["team"] == "ml" for a in alerts.values())


def test_dashboards_are_configmaps_for_the_grafana_sidecar(helm_template: Render) -> None:
    docs = helm_template({"dashboards": {"enabled": True}})
    maps = [d for d in by_kind(docs, "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(maps) == len(files) >= 2
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # removed: the sub-chart flags (prerequisites are installed separately) and the
        # artifact repository (no PSFTJob Workflow uses an Argo artifact repository)
        ({"minio": {"enabled": True}}, "'minio' not allowed"),
        ({"argo-workflows": {"enabled": True}}, "'argo-workflows' not allowed"),
        ({"artifactRepository": {"create": True}}, "'artifactRepository' not allowed"),
        ({"operator": {"replicas": "two"}}, "/operator/replicas"),
        ({"operator": {"replica": 2}}, "'replica' not allowed"),
        ({"operator": {"replicas": 3, "leaderElection": {"enabled": False}}}, "leaderElection"),
        ({"alerts": {"entropyCollapse": {"fraction": 1.5}}}, "/alerts/entropyCollapse/fraction"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
        (
            {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
            "metrics.service.enabled",
        ),
    ],
)
def test_bad_or_missing_values_fail_with_the_key(
    chart_dir: Path, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_tool("helm", "template", RELEASE, str(chart_dir), "--values", str(path), check=False)
    assert proc.returncode != 0, f"helm template accepted {values}"
    assert message in proc.stderr, proc.stderr


def test_crds_ship_with_the_chart(chart_dir: Path) -> None:
    crd_files = sorted((CHART / "crds").glob("*.yaml"))
    if not crd_files:
        pytest.fail("charts/psft/crds/ holds no CRD (generated by psft.workflows.crd)")
    proc = run_tool("helm", "template", RELEASE, str(chart_dir), "--include-crds")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    crds = by_kind(docs, "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} == {
        "psftjobs.psft.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    validate_manifests(crds)


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "all-on"])
def test_templates_render_no_crd_and_no_hook(helm_template: Render, values: dict[str, Any]) -> None:
    """Every CRD is in crds/, which helm creates and waits for before the templates: a CRD
    among the templates could be used (by a hook, or by an object of its kind) before the
    API server serves it, which failed `helm install` once in three runs."""
    docs = helm_template(values)
    assert not by_kind(docs, "CustomResourceDefinition")
    hooks = [
        d["metadata"]["name"]
        for d in docs
        if "helm.sh/hook" in (d["metadata"].get("annotations") or {})
    ]
    assert not hooks
    served = {
        (f"{c['spec']['group']}/{v['name']}", c["spec"]["names"]["kind"])
        for c in chart_crds()
        for v in c["spec"]["versions"]
    }
    for doc in docs:
        if doc["apiVersion"].startswith(("kopf.dev/", "psft.dev/")):
            assert (doc["apiVersion"], doc["kind"]) in served, doc["kind"]


def _operator_rule_triples(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    triples = set()
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role") and "-operator" in doc["metadata"]["name"]:
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        triples |= {(group, resource, verb) for verb in rule["verbs"]}
    return triples


def test_operator_rbac_is_exactly_what_its_code_uses(helm_template: Render) -> None:
    from psft.operator.rbac import OPERATOR_RULES

    used = {
        (group, resource, verb)
        for rule in OPERATOR_RULES
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    secrets = {"operator": {"rbac": {"readSecrets": True}}}
    cluster = _operator_rule_triples(helm_template(secrets))
    namespaced = _operator_rule_triples(
        helm_template({"operator": {"watchNamespaces": ["team-a"], "rbac": {"readSecrets": True}}})
    )
    # each mode grants nothing the operator does not use...
    assert cluster <= used, f"granted but unused: {sorted(cluster - used)}"
    assert namespaced <= used, f"granted but unused: {sorted(namespaced - used)}"
    # ...and together they grant all of it; the only difference is kopf's peering kind
    assert cluster | namespaced == used, (
        f"used but not granted: {sorted(used - cluster - namespaced)}"
    )
    assert cluster ^ namespaced == {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")
    } | {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    # secrets only on request, only `get`; no write access to pods or secrets ever
    default = _operator_rule_triples(helm_template())
    assert not {t for t in default if t[1] == "secrets"}
    assert {t for t in cluster if t[1] == "secrets"} == {("", "secrets", "get")}
    # single replica without leader election: no peering rights
    standalone = _operator_rule_triples(
        helm_template({"operator": {"leaderElection": {"enabled": False}}})
    )
    assert not {t for t in standalone if t[0] == "kopf.dev"}


def test_workflow_role_grants_rayjobs_only_when_asked(helm_template: Render) -> None:
    plain = one(helm_template(), "Role", "workflow")["rules"]
    ray = one(helm_template({"workflows": {"rayJobs": True}}), "Role", "workflow")["rules"]
    assert {g for r in plain for g in r["apiGroups"]} == {"argoproj.io"}
    assert {"ray.io", ""} <= {g for r in ray for g in r["apiGroups"]}
    # the supervisor deletes only a RayJob (one an earlier attempt of its job left)
    assert [r["resources"] for r in ray if "delete" in r["verbs"]] == [["rayjobs"]]
    # Argo's setOwnerReference makes the RayJob and its ConfigMap owned by the Workflow with
    # blockOwnerDeletion (metav1.NewControllerRef in workflow/controller/operator.go):
    # OwnerReferencesPermissionEnforcement then asks for update on the owner's finalizers
    finalizers = {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflows/finalizers"],
        "verbs": ["update"],
    }
    assert finalizers in ray and finalizers not in plain


@pytest.mark.parametrize("flags", ["defaults", "all-on"])
def test_notes_render(chart_dir: Path, tmp_path: Path, flags: str) -> None:
    """NOTES.txt is only rendered by install; a client-side dry run needs no cluster."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(ALL_ON if flags == "all-on" else {}))
    proc = run_tool(
        "helm", "install", RELEASE, str(chart_dir), "--namespace", NAMESPACE,
        "--dry-run=client", "--values", str(values),
    )  # fmt: skip
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f examples/qwen2.5-7b-limo.yaml" in notes
    if flags == "all-on":
        assert "team-a, team-b" in notes and "KubeRay operator (v1.4-1.7" in notes
        assert "PSFTEntropyCollapse" in notes
    else:
        assert "installs none of its prerequisites" in notes
        assert "Argo Workflows controller (v3.6-4.x)" in notes and "KubeRay" not in notes
