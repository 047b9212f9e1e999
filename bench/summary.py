"""Regenerate docs/benchmarks.md's summary table from bench/results/*.json: one row per result
file, dated from its own ``date`` (else the file's mtime) and naming the machine it ran on, so a
reader sees which figures are current and where they came from. Writes between the
``<!-- summary:begin -->`` / ``<!-- summary:end -->`` markers.

    python bench/summary.py            # rewrite the table in docs/benchmarks.md
    python bench/summary.py --check    # exit 1 if the table is stale
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
MAX_FIGURES = 6  # a row stays readable; the full record is the JSON file


def _machine(m: Any) -> str:
    if isinstance(m, dict):
        gpu = m.get("gpu") or "no GPU"
        return f"{m.get('host', '?')}, {m.get('cpus', '?')} CPUs, {gpu}"
    return str(m) if m else "not recorded"


def _fmt(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _figures(d: dict[str, Any]) -> str:
    """Ratios first (the comparable figures), then top-level numeric results other than settings."""
    out = [f"{k} {_fmt(v)}" for k, v in (d.get("ratios") or {}).items() if isinstance(v, int | float)]
    for k, v in d.items():
        if (
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and any(w in k for w in ("ratio", "median", "p50", "gain", "_ms", "tflops", "mfu"))
        ):
            out.append(f"{k} {_fmt(v)}")
    return "; ".join(out[:MAX_FIGURES]) or "see the JSON file"


def table() -> str:
    rows = ["| benchmark | date | machine | headline figures (from the JSON) |", "|---|---|---|---|"]
    for f in sorted(RESULTS.glob("*.json")):
        d = json.loads(f.read_text())
        date = d.get("date") or time.strftime("%Y-%m-%d %H:%M", time.gmtime(f.stat().st_mtime)) + " (file mtime)"
        rows.append(f"| `{f.name}` | {date} | {_machine(d.get('machine'))} | {_figures(d)} |")
    return "\n".join(rows)


def render(doc: str) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: needs the markers {BEGIN} and {END} around the summary table")
    head, rest = doc.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{rest.split(END, 1)[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md's table is stale")
    args = ap.parse_args()
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        sys.exit(0 if new == doc else 1)
    DOC.write_text(new)


if __name__ == "__main__":
    main()
