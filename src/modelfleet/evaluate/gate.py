"""The quality gate of ``modelfleet deploy NAME --artifact X --if-better METRIC``: evaluate the
candidate and the artifact being served on the same held-out rows and promote only a winner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelfleet import registry
from modelfleet.config import ServeConfig
from modelfleet.errors import ConfigError
from modelfleet.evaluate.batch import evaluate_artifact
from modelfleet.metrics import LOWER_IS_BETTER


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    candidate: str
    candidate_value: float
    served: str
    served_value: float
    data: str
    rows: int

    def explain(self) -> str:
        """One line saying which numbers decided."""

        op = "<" if self.metric in LOWER_IS_BETTER else ">"
        verdict = "promote" if self.promote else "refuse"
        held = "holds" if self.promote else "does not hold"
        return (
            f"{verdict}: candidate {self.candidate} {self.metric}={self.candidate_value:.4f} vs served "
            f"{self.served} {self.metric}={self.served_value:.4f} on {self.rows} rows of {self.data}/raw/test "
            f"(needs candidate {op} served, which {held})"
        )


def _label(ref: registry.ArtifactRef) -> str:
    return f"{ref.name}@{ref.version}" if ref.name else ref.uri


def check(cfg: ServeConfig, model: str, artifact: str, metric: str, *, data: str | None = None) -> Decision:
    """Evaluate the candidate and the artifact ``cfg`` (a running app's config) serves as ``model``
    on the same data; decide on ``metric``."""

    spec = cfg.model(model)
    served = registry.resolve(cfg.storage_path, spec.artifact)
    if artifact in ("latest",) or (artifact.startswith("v") and artifact[1:].isdigit()):
        artifact = f"{spec.artifact.partition('@')[0]}@{artifact}"
    cand = registry.resolve(cfg.storage_path, artifact)
    data = data or registry.read_json(cand.uri, "manifest.json")["config"]["data"]["path"]
    results: dict[str, Any] = {}
    for role, ref in (("candidate", cand), ("served", served)):
        results[role] = evaluate_artifact(ref.uri, data)["metrics"]
        if not isinstance(results[role].get(metric), (int, float)):
            valid = [k for k, v in results[role].items() if isinstance(v, float)]
            raise ConfigError(
                f"--if-better: metric {metric!r} is not reported for the {role} artifact "
                f"{_label(ref)}; valid metrics: {', '.join(valid)}"
            )
    c, s = float(results["candidate"][metric]), float(results["served"][metric])
    better = c < s if metric in LOWER_IS_BETTER else c > s
    rows = int(results["candidate"].get("n", results["candidate"].get("tokens", 0)))
    return Decision(better, metric, _label(cand), c, _label(served), s, data, rows)
