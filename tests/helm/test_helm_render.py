"""The chart lints and renders with every CI value file, and every object it renders is valid:
KubeRay kinds against the KubeRay CRDs (closed schemas), core kinds with kubernetes-validate."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_objects import CHART, CI_VALUES, RAY_KINDS, RAY_NAME_LIMITS, cluster_specs, pod_templates, services

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion); newer ones accept more.
K8S_VERSION = "1.25.0"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
REQUIRED_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}


@pytest.mark.parametrize("values", CI_VALUES)
def test_lint_passes_strict(helm, values):
    proc = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "-f", str(CHART / "ci" / values)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_value_files_cover_the_documented_setups():
    assert {"defaults-values.yaml", "gpu-values.yaml", "serve-only-values.yaml", "train-only-values.yaml"} <= set(
        CI_VALUES
    )


@pytest.mark.parametrize("values", CI_VALUES)
def test_every_object_is_named_and_labelled(ci_renders, values):
    docs = ci_renders[values]
    assert docs, "nothing rendered"
    for d in docs:
        meta = d["metadata"]
        name = meta["name"]
        assert len(name) <= 63 and DNS1123.match(name), f"{d['kind']} name {name!r}"
        if d["kind"] in RAY_KINDS:
            assert len(name) <= RAY_NAME_LIMITS[d["kind"]] and DNS1035.match(name), (
                f"KubeRay rejects {d['kind']} name {name!r} (DNS-1035, <= {RAY_NAME_LIMITS[d['kind']]})"
            )
        labels = meta.get("labels", {})
        assert REQUIRED_LABELS <= set(labels), f"{d['kind']}/{name} lacks {REQUIRED_LABELS - set(labels)}"
        for k, v in labels.items():
            assert isinstance(v, str) and len(v) <= 63 and LABEL_VALUE.match(v), f"{name}: label {k}={v!r}"
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_long_release_names_are_cut_to_kuberay_limits(render):
    release = "a" + "b" * 52  # Helm's own limit is 53 characters
    docs = render(None, "rayCluster.enabled=true", release=release)
    for d in docs:
        limit = RAY_NAME_LIMITS.get(d["kind"], 63)
        assert len(d["metadata"]["name"]) <= limit, (d["kind"], d["metadata"]["name"])
    names = {d["metadata"]["name"] for d in docs}
    assert len(names) == len(docs), "cutting names made two objects collide"


@pytest.mark.parametrize("values", CI_VALUES)
def test_kuberay_objects_validate_against_the_crds(ci_renders, crd_validators, values):
    ray_docs = [d for d in ci_renders[values] if d["kind"] in RAY_KINDS]
    assert ray_docs, "no KubeRay object rendered"
    for d in ray_docs:
        validator = crd_validators.get((d["apiVersion"], d["kind"]))
        assert validator, f"no CRD for {d['apiVersion']} {d['kind']}"
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(d)]
        assert not errors, f"{d['kind']}/{d['metadata']['name']}:\n" + "\n".join(errors[:10])


def test_closed_crd_schema_rejects_an_unknown_field(render, crd_validators):
    """The strictness the test above relies on: a misspelt field must not validate."""
    rs = next(d for d in render() if d["kind"] == "RayService")
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    assert not crd_validators[("ray.io/v1", "RayService")].is_valid(rs)


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        msg = "kubernetes-validate is not installed; add it to pyproject.toml [project.optional-dependencies] dev"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return kubernetes_validate


def _core_objects(docs):
    """Core-API objects to check: plain objects, serveService, and each Ray pod template."""
    out = [d for d in docs if d["kind"] not in RAY_KINDS and not d["apiVersion"].startswith("monitoring.coreos.com")]
    out += [s for s in services(docs) if s not in out]
    for owner, spec in cluster_specs(docs):
        for group, tpl in pod_templates(spec):
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{owner['metadata']['name']}-{group}"},
                    "template": tpl,
                }
            )
    return out


@pytest.mark.parametrize("values", CI_VALUES)
def test_core_objects_validate_strictly(ci_renders, kubernetes_validate, values):
    for obj in _core_objects(ci_renders[values]):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata'].get('name')}: {e.message} at "
                f"{'.'.join(map(str, e.path))}\n{yaml.safe_dump(obj)[:2000]}"
            )


def render_notes(helm: str, tmp_path: Path, *sets: str) -> str:
    """`helm template` skips NOTES.txt, so render a copy of the chart where NOTES is a value."""
    chart = tmp_path / "modelfleet"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}' + notes + "{{- end }}")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "test.notes" . | toJson }}\n')
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [helm, "template", "mf", str(chart), "--show-only", "templates/notes.yaml", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["notes"]


def test_notes_say_how_to_reach_serving_dashboard_and_jobs(helm, tmp_path):
    text = render_notes(helm, tmp_path)
    for expected in (
        "port-forward svc/mf-modelfleet-http 8000:8000",  # the serving Service
        "create secret generic mf-modelfleet-api-key",  # the API key it needs
        "port-forward svc/mf-modelfleet-serve-head-svc 8265:8265",
        "get rayjob mf-modelfleet-train",
        "ray job submit --address http://127.0.0.1:8265",
        "RAY_AUTH_TOKEN",
    ):
        assert expected in text, f"NOTES.txt lacks {expected!r}:\n{text}"
    assert "WARNING" not in text


def test_notes_warn_about_every_acknowledged_insecure_setting(helm, tmp_path):
    text = render_notes(
        helm,
        tmp_path,
        "rayAuth.enabled=false",
        "insecure.allowNoRayAuth=true",
        "networkPolicy.enabled=false",
        "insecure.allowNoNetworkPolicy=true",
        "serving.ingress.enabled=true",
        "insecure.allowIngressWithoutTls=true",
        "serving.apiKey.required=false",
        "insecure.allowNoApiKey=true",
    )
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 4, text
    assert any("without an API key" in w for w in warnings)
    assert any("token authentication is OFF" in w for w in warnings)
    assert any("NetworkPolicy is OFF" in w for w in warnings)
    assert any("Ingress has no TLS" in w for w in warnings)
    assert "RAY_AUTH_TOKEN" not in text  # no token to export when auth is off
