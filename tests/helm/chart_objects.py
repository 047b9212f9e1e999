"""Ways into rendered chart objects: the Ray cluster specs inside RayService/RayJob/RayCluster,
their pod templates and containers, and every Service (including the RayService's serveService)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "modelfleet"
CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# KubeRay rejects longer names (ray-operator utils.MaxRay*NameLength): it appends suffixes.
RAY_NAME_LIMITS = {"RayService": 47, "RayJob": 47, "RayCluster": 53}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def cluster_spec(doc: dict) -> dict:
    return {
        "RayService": lambda s: s["rayClusterConfig"],
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayCluster": lambda s: s,
    }[doc["kind"]](doc["spec"])


def cluster_specs(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for d in docs:
        if d["kind"] in RAY_KINDS:
            yield d, cluster_spec(d)


def pod_templates(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]


def containers(docs: list[dict]) -> Iterator[tuple[dict, str, dict]]:
    """(owning object, group name, container) for every Ray container in every cluster."""
    for d, spec in cluster_specs(docs):
        for group, tpl in pod_templates(spec):
            for c in tpl["spec"]["containers"]:
                yield d, group, c


def services(docs: list[dict]) -> list[dict]:
    """Every Service the release creates: plain ones and the RayService's serveService."""
    out = of_kind(docs, "Service")
    for rs in of_kind(docs, "RayService"):
        if "serveService" in rs["spec"]:
            out.append({"apiVersion": "v1", "kind": "Service", **rs["spec"]["serveService"]})
    return out
