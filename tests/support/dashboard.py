"""The Grafana dashboard's PromQL, for the tests: every expression, made concrete, and its metrics."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "svd-service.json"

# Grafana fills these in from the time range and the scrape interval; any valid range will do to
# evaluate the expression (a minute holds many 1 s scrapes).
_GRAFANA_RANGES = re.compile(r"\$__(rate_interval|interval|range)\b")

# Words in PromQL that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan", "atan2"}


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"{self.panel!r} {self.ref_id}: {self.expr}"


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in doc.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(doc: dict[str, Any] | None = None) -> list[Query]:
    doc = doc if doc is not None else load()
    return [
        Query(panel["title"], target["refId"], target["expr"])
        for panel in panels(doc)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def concrete(expr: str) -> str:
    """The expression with Grafana's variables replaced, ready for Prometheus's query API."""
    out = _GRAFANA_RANGES.sub("1m", expr)
    if "$" in out:
        raise ValueError(f"unhandled Grafana variable in {expr!r}")
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    # Label lists of aggregations and vector matching.
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = match.group()
        before = s[: match.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the exponent or unit of a number: 1e3, 5m
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names
