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
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .markdown import table_head

# Gated ratios: lower is better for each.
GATED = ("overhead_ratio", "relative_e2e", "shared_ratio")
CONFIDENCE = 0.95

PASS, REGRESSION, INCONCLUSIVE = "pass", "regression", "inconclusive"


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, df)) if df > 0 else math.inf


@dataclass(frozen=True)
class Interval:
    """A ratio's estimate (geometric mean of the pair ratios) and its confidence bounds;
    `logs` the pairs' log-ratios (a later run compares itself with them); a sequential
    run's `rounds`, `seconds`, the number of `looks` it made and the per-look `level`."""

    value: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE
    logs: tuple[float, ...] = ()
    rounds: int | None = None
    seconds: float | None = None
    looks: int | None = None
    level: float | None = None
    detectable: float | None = None  # smallest slowdown this run would have flagged

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["logs"] = list(self.logs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        known["high"] = math.inf if known.get("high") is None else known["high"]
        known["logs"] = tuple(known.get("logs") or ())
        return cls(**known)


def ratio_interval(
    candidate: list[float], reference: list[float], confidence: float = CONFIDENCE
) -> Interval:
    """The interval of candidate/reference over pairs (same index = one interleaved
    round). One pair has no interval: its bounds are 0 and infinity."""
    return interval_of(pair_logs(candidate, reference), confidence)


def pair_logs(candidate: list[float], reference: list[float]) -> list[float]:
    logs = [math.log(a / b) for a, b in zip(candidate, reference) if a > 0 and b > 0]
    if not logs:
        raise ValueError("no positive pairs to take a ratio of")
    return logs


def interval_of(
    logs: list[float], confidence: float = CONFIDENCE, level: float | None = None
) -> Interval:
    """Student's t interval of the pairs' log-ratios at `level` (default `confidence`)."""
    level = level or confidence
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return Interval(math.exp(mean), 0.0, math.inf, len(logs), confidence, tuple(logs))
    half = t_quantile(0.5 + level / 2, len(logs) - 1) * statistics.stdev(logs)
    half /= math.sqrt(len(logs))
    return Interval(
        math.exp(mean),
        math.exp(mean - half),
        math.exp(mean + half),
        len(logs),
        confidence,
        tuple(logs),
        level=level,
    )


def median_interval(
    logs: list[float], confidence: float = CONFIDENCE, level: float | None = None
) -> Interval:
    """The median pair ratio with its distribution-free interval (the sign test's order
    statistics): no assumption on the noise, so a round slowed by another process on a
    shared runner moves it by one rank, not by its size. Too few pairs for the level: no
    interval (0 to infinity)."""
    from scipy.stats import binom

    level = level or confidence
    x = sorted(logs)
    n, alpha = len(x), 1 - level
    center = math.exp(statistics.median(x))
    d = 0
    while binom.cdf(d, n, 0.5) <= alpha / 2:  # P(X <= d) for the next order statistic
        d += 1
    if d == 0:
        return Interval(center, 0.0, math.inf, n, confidence, tuple(logs), level=level)
    return Interval(
        center, math.exp(x[d - 1]), math.exp(x[n - d]), n, confidence, tuple(logs), level=level
    )


def against_baseline(
    logs: list[float], base: Interval, confidence: float = CONFIDENCE, level: float | None = None
) -> Interval:
    """The current ratio's interval as a comparison with a stored run's pairs: the
    Hodges-Lehmann shift between the two samples of log-ratios with its Mann-Whitney
    interval (distribution-free; the baseline's own noise counts), on the current ratio's
    scale: baseline x exp(shift). With no pairs stored for the baseline it is taken as
    exact (`median_interval`)."""
    level = level or confidence
    if len(base.logs) < 2 or len(logs) < 2:
        iv = median_interval(logs, confidence, level)
        return iv
    from statistics import NormalDist

    m, n = len(logs), len(base.logs)
    # The baseline's value is its pairs' centre; the value stands where a file says
    # otherwise (an edited baseline), its pairs give the noise.
    shift_base = math.log(base.value) - statistics.median(base.logs)
    diffs = sorted(a - b - shift_base for a in logs for b in base.logs)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    c = math.floor(m * n / 2 - z * math.sqrt(m * n * (m + n + 1) / 12))
    center = base.value * math.exp(statistics.median(diffs))
    if c < 1:
        return Interval(center, 0.0, math.inf, m, confidence, tuple(logs), level=level)
    low, high = diffs[c - 1], diffs[m * n - c]
    return Interval(
        center,
        base.value * math.exp(low),
        base.value * math.exp(high),
        m,
        confidence,
        tuple(logs),
        level=level,
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
            f"{self.baseline:.3f}, limit {self.limit:.3f}: {self.verdict}{self.effort()}"
        )

    def effort(self) -> str:
        """`; 12 rounds, 31 s, detects slowdowns over 14%` for a sequential run."""
        c = self.current
        if c.rounds is None:
            return ""
        found = f", detects slowdowns over {c.detectable:.0%}" if c.detectable is not None else ""
        return f" ({c.rounds} rounds, {c.seconds:.0f} s{found})"

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
            iv = Interval.from_dict(interval)
            limit, verdict = decide(iv, float(old[ratio]), tolerance)
            checks.append(Check(name, ratio, iv, float(old[ratio]), limit, verdict))
    return GateResult(tolerance, checks, missing)


def detectable(iv: Interval, tolerance: float) -> float | None:
    """The smallest slowdown a gate with an interval this wide flags: the limit's
    (1 + tolerance) times the interval's half-width on the ratio scale; None without an
    interval."""
    if not (math.isfinite(iv.high) and iv.low > 0):
        return None
    return (1 + tolerance) * math.sqrt(iv.high / iv.low) - 1


def regate(report: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """A stored run's gated ratios looked at once against `plan`'s baseline (a report
    gated after it was measured, `bench gate`): each interval recomputed from the run's
    pairs against the baseline's (`against_baseline`, at the plan's confidence: one look,
    so no Bonferroni split), as the run itself would have at that look. A ratio stored
    without its pairs keeps its interval."""
    import copy

    out = copy.deepcopy(report)
    for name, entry in out.get("models", {}).items():
        for ratio, stored in (entry.get("intervals") or {}).items():
            target = plan.targets.get(f"{name}|{ratio}")
            if target is None or not stored.get("logs"):
                continue
            iv = against_baseline(
                list(stored["logs"]), Interval.from_dict(target["baseline"]), plan.confidence
            )
            entry["intervals"][ratio] = {
                **iv.to_dict(),
                "rounds": stored.get("rounds"),
                "seconds": stored.get("seconds"),
                "detectable": detectable(iv, plan.tolerance),
            }
            entry[ratio] = iv.value
    return out


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
        case = ET.SubElement(
            ts,
            "testcase",
            classname=f"latency.{c.model}",
            name=c.ratio,
            time=f"{c.current.seconds or 0:.1f}",
        )
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
        *table_head(
            "model",
            "ratio",
            "current",
            "interval",
            "baseline",
            "limit",
            "verdict",
            "rounds",
            "seconds",
            "detects over",
        ),
    ]
    for c in result.checks:
        iv = c.current
        span = f"{iv.low:.3f} – {iv.high:.3f}" if math.isfinite(iv.high) else f"n={iv.n}"
        detect = f"{iv.detectable:.0%}" if iv.detectable is not None else ""
        lines.append(
            f"| {c.model} | {c.ratio} | {iv.value:.3f} | {span} | {c.baseline:.3f} | "
            f"{c.limit:.3f} | {icon[c.verdict]} {c.verdict} | {iv.rounds or iv.n} | "
            f"{'' if iv.seconds is None else f'{iv.seconds:.0f}'} | {detect} |"
        )
    for m in result.missing:
        lines.append(f"| {m} | | not measured | | | | ⚠️ missing | | | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- sequential rounds


@dataclass(frozen=True)
class Plan:
    """How a gated run measures: interleaved rounds until every gated ratio is decided
    (its interval wholly under the limit, or wholly above it), looking at the data after
    `first` rounds and then whenever the rounds have grown by half, until `max_repeat`
    rounds or `budget_s` seconds; the last round made is a look too. Each look's interval
    is at level 1 - alpha/K, K the looks the schedule allows (Bonferroni over the looks):
    all of them hold together with probability at least `confidence`, so stopping at the
    first that clears inflates no false alarm. `targets`: for each gated ratio
    ("MODEL|ratio"), the baseline's interval (its value and pairs) and the tolerance; with
    `precision` instead, a run stops when every interval's half-width is under it (a
    baseline on purpose)."""

    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    tolerance: float = 0.10
    budget_s: float = 300.0
    max_repeat: int = 64
    first: int = 4
    confidence: float = CONFIDENCE
    precision: float | None = None

    def schedule(self) -> list[int]:
        looks, n = [], max(2, self.first)
        while n < self.max_repeat:
            looks.append(n)
            n = max(n + 1, math.ceil(n * 1.5))
        return looks + [self.max_repeat]

    @property
    def level(self) -> float:
        return 1 - (1 - self.confidence) / len(self.schedule())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_plan(
    baseline: dict[str, Any] | None,
    tolerance: float,
    *,
    budget_s: float = 300.0,
    max_repeat: int = 64,
    first: int = 4,
) -> Plan:
    """The plan of a gated run against a stored report (each gated ratio it has, by
    model name: its interval, with its pairs where stored), or with no baseline the plan
    of a baseline made on purpose: rounds until every ratio is known to within a third of
    the tolerance (on the log scale), so the gate later compares with a precise value."""
    if baseline is None:
        return Plan(
            tolerance=tolerance,
            budget_s=budget_s,
            max_repeat=max_repeat,
            first=first,
            precision=math.log1p(tolerance) / 3,
        )
    targets = {}
    for name, old in baseline.get("models", {}).items():
        for ratio in GATED:
            if ratio not in old:
                continue
            stored = (old.get("intervals") or {}).get(ratio) or {}
            value = float(old[ratio])
            targets[f"{name}|{ratio}"] = {
                "baseline": {
                    "value": value,
                    "low": stored.get("low", value),
                    "high": stored.get("high", value),
                    "n": stored.get("n", 0),
                    "logs": stored.get("logs", []),
                }
            }
    return Plan(targets, tolerance, budget_s, max_repeat, first)


class Sequential:
    """Follows a run's rounds for a Plan: `after_round(n, pairs)` looks when the schedule
    (or the end) says so, and says whether to stop; `decided` keeps each ratio's first
    decisive look (or its last look)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.t0 = time.perf_counter()
        self.looks = 0
        self.decided: dict[str, dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def interval(self, key: str, logs: list[float]) -> Interval:
        target = self.plan.targets.get(key)
        base = Interval.from_dict(target["baseline"]) if target else None
        if base is None:
            return median_interval(logs, self.plan.confidence, self.plan.level)
        return against_baseline(logs, base, self.plan.confidence, self.plan.level)

    def verdict(self, key: str, iv: Interval) -> str:
        if self.plan.precision is not None:
            wide = (
                not math.isfinite(iv.high) or math.log(iv.high / iv.low) / 2 > self.plan.precision
            )
            return INCONCLUSIVE if wide else PASS
        target = self.plan.targets.get(key)
        if target is None:
            return PASS  # not gated: it never holds the run
        return decide(iv, float(Interval.from_dict(target["baseline"]).value), self.plan.tolerance)[
            1
        ]

    def after_round(self, n: int, pairs: dict[str, tuple[list[float], list[float]]]) -> bool:
        elapsed = time.perf_counter() - self.t0
        per_round = elapsed / max(n, 1)
        last = n >= self.plan.max_repeat or elapsed + per_round > self.plan.budget_s
        if n not in self.plan.schedule() and not last:
            return False
        self.looks += 1
        for key, (cand, ref) in pairs.items():
            if key in self.decided:
                continue
            iv = self.interval(key, pair_logs(cand, ref))
            info = {
                **iv.to_dict(),
                "rounds": n,
                "seconds": round(elapsed, 2),
                "looks": self.looks,
                "detectable": detectable(iv, self.plan.tolerance),
            }
            self.last[key] = info
            if self.verdict(key, iv) != INCONCLUSIVE:
                self.decided[key] = info
        return last or all(k in self.decided for k in pairs)

    def result(self, key: str) -> dict[str, Any] | None:
        """The interval to report for `key`: its decisive look, else its last one."""
        return self.decided.get(key) or self.last.get(key)
