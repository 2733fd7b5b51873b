"""The CI gate of `verm-local bench latency`: each gated ratio with a confidence interval
over interleaved repeats, a verdict against a stored baseline, and the reports CIs show
(JUnit XML, the GitHub step summary).

A ratio is measured in pairs: candidate and reference run one after the other (A, B, A,
B ...) in one process, so a slow spell of a shared runner slows both and the pair's ratio
keeps. The interval is Student's t over the log of the pair ratios (ratios multiply, so
their logs are what averages). Against a baseline value `b` and a tolerance `tol`, the
limit is `b * (1 + tol)`:

- regression: the whole interval lies above the limit;
- pass: the whole interval lies at or below it;
- inconclusive: the interval straddles it (the noise is wider than the tolerance allows
  to decide), or there are too few pairs for an interval (fewer than 2)."""

from __future__ import annotations

import math
import statistics
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from .markdown import table_head

# Gated ratios: lower is better for each.
GATED = ("overhead_ratio", "relative_e2e", "shared_ratio")
CONFIDENCE = 0.95

PASS, REGRESSION, INCONCLUSIVE = "pass", "regression", "inconclusive"


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for df 1 and 2, else the Cornish-Fisher series from the
    normal quantile (within 0.2% of the tables at the 95% level for df >= 3; 0.8% short
    of them at 99% for df 3)."""
    if df <= 0:
        return math.inf
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        a = 2 * p - 1
        return a * math.sqrt(2 / (1 - a * a))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class Interval:
    """A ratio's estimate (geometric mean of the pair ratios) and its confidence bounds."""

    value: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio_interval(
    candidate: list[float], reference: list[float], confidence: float = CONFIDENCE
) -> Interval:
    """The interval of candidate/reference over pairs (same index = one interleaved
    round). One pair has no interval: its bounds are 0 and infinity."""
    logs = [math.log(a / b) for a, b in zip(candidate, reference) if a > 0 and b > 0]
    if not logs:
        raise ValueError("no positive pairs to take a ratio of")
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return Interval(math.exp(mean), 0.0, math.inf, len(logs), confidence)
    half = _t_quantile(0.5 + confidence / 2, len(logs) - 1) * statistics.stdev(logs)
    half /= math.sqrt(len(logs))
    return Interval(
        math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs), confidence
    )


@dataclass(frozen=True)
class Check:
    """One gated ratio of one model against its baseline."""

    model: str
    ratio: str
    current: Interval
    baseline: float
    limit: float
    verdict: str

    @property
    def name(self) -> str:
        return f"{self.model}: {self.ratio}"

    def line(self) -> str:
        c = self.current
        span = (
            f"[{c.low:.3f}, {c.high:.3f}]"
            if math.isfinite(c.high)
            else f"no interval from {c.n} pair(s)"
        )
        return (
            f"{self.name} {c.value:.3f} ({c.confidence:.0%} interval {span}) vs baseline "
            f"{self.baseline:.3f}, limit {self.limit:.3f}: {self.verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["current"] = self.current.to_dict()
        if not math.isfinite(self.current.high):
            out["current"]["high"] = None
        return out


@dataclass(frozen=True)
class GateResult:
    tolerance: float
    checks: list[Check] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # baseline models/ratios not measured

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.checks}
        if REGRESSION in verdicts:
            return REGRESSION
        if INCONCLUSIVE in verdicts or not self.checks:
            return INCONCLUSIVE
        return PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "tolerance": self.tolerance,
            "checks": [c.to_dict() for c in self.checks],
            "missing": self.missing,
        }


def decide(current: Interval, baseline: float, tolerance: float) -> tuple[float, str]:
    limit = baseline * (1 + tolerance)
    if current.low > limit:
        return limit, REGRESSION
    if current.high <= limit:
        return limit, PASS
    return limit, INCONCLUSIVE


def evaluate(report: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> GateResult:
    """Each gated ratio the run measured with an interval, against the baseline's value
    of it. A model or ratio of the baseline that this run did not measure is listed in
    `missing` (no check, so it cannot pass silently: no checks at all is inconclusive)."""
    checks, missing = [], []
    for name, old in baseline.get("models", {}).items():
        cur = report["models"].get(name)
        for ratio in GATED:
            if ratio not in old:
                continue
            interval = (cur or {}).get("intervals", {}).get(ratio)
            if interval is None:
                missing.append(f"{name}: {ratio}")
                continue
            iv = Interval(**{**interval, "high": interval["high"] or math.inf})
            limit, verdict = decide(iv, float(old[ratio]), tolerance)
            checks.append(Check(name, ratio, iv, float(old[ratio]), limit, verdict))
    return GateResult(tolerance, checks, missing)


def junit_xml(result: GateResult, *, suite: str = "verm-local bench latency") -> str:
    """One test case per gated ratio: a failure carries the numbers; inconclusive is
    `skipped` with the numbers (neither pass nor regression)."""
    failures = sum(c.verdict == REGRESSION for c in result.checks)
    skipped = sum(c.verdict == INCONCLUSIVE for c in result.checks) + len(result.missing)
    root = ET.Element("testsuites", name=suite)
    ts = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(result.checks) + len(result.missing)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    for c in result.checks:
        case = ET.SubElement(ts, "testcase", classname=f"latency.{c.model}", name=c.ratio)
        if c.verdict == REGRESSION:
            ET.SubElement(case, "failure", message=c.line(), type="regression").text = c.line()
        elif c.verdict == INCONCLUSIVE:
            ET.SubElement(case, "skipped", message=c.line())
        ET.SubElement(case, "system-out").text = c.line()
    for m in result.missing:
        model, _, ratio = m.partition(": ")
        case = ET.SubElement(ts, "testcase", classname=f"latency.{model}", name=ratio)
        ET.SubElement(case, "skipped", message=f"{m}: in the baseline, not measured by this run")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def summary_markdown(result: GateResult, baseline_path: str | Path) -> str:
    """The gate's verdict and its checks as Markdown (for the CI's page)."""
    icon = {PASS: "✅", REGRESSION: "❌", INCONCLUSIVE: "⚠️"}
    lines = [
        f"## Latency gate: {icon[result.verdict]} {result.verdict}",
        "",
        f"Against `{baseline_path}`, tolerance {result.tolerance:.0%}: a ratio fails when "
        "its whole confidence interval lies above baseline x (1 + tolerance).",
        "",
        *table_head("model", "ratio", "current", "interval", "baseline", "limit", "verdict"),
    ]
    for c in result.checks:
        iv = c.current
        span = f"{iv.low:.3f} – {iv.high:.3f}" if math.isfinite(iv.high) else f"n={iv.n}"
        lines.append(
            f"| {c.model} | {c.ratio} | {iv.value:.3f} | {span} | {c.baseline:.3f} | "
            f"{c.limit:.3f} | {icon[c.verdict]} {c.verdict} |"
        )
    for m in result.missing:
        lines.append(f"| {m} | | not measured | | | | ⚠️ missing |")
    return "\n".join(lines) + "\n"
