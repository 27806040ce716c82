"""The benchmark harness: repeat, take medians and min–max, compare side by side as ratios.

A figure is a function `(ctx) -> dict[str, Measurement | Any]` registered with `@figure`. Figures that need
something this machine lacks (root, the lab, the Pulumi CLI) raise `Skip` with the reason, which the report
states instead of a number. Tests never assert wall-clock times; this harness is where times live.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Skip(Exception):
    """A figure cannot be measured on this machine; the message says why."""


@dataclass
class Measurement:
    """Repeated timings of one thing (seconds) with optional work units for throughput."""

    samples: list[float]
    unit: str = "s"
    goal: str = ""

    @property
    def median(self) -> float:
        """Median of the samples."""
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        """JSON form: median, min, max, n."""
        return {
            "median": round(self.median, 4),
            "min": round(min(self.samples), 4),
            "max": round(max(self.samples), 4),
            "n": len(self.samples),
            "unit": self.unit,
            **({"goal": self.goal} if self.goal else {}),
        }

    def __str__(self) -> str:
        if len(self.samples) == 1:
            return f"{self.median:.3g} {self.unit}"
        return f"{self.median:.3g} {self.unit} ({min(self.samples):.3g}–{max(self.samples):.3g}, n={len(self.samples)})"


@dataclass
class Ratio:
    """A side-by-side comparison measured in the same run: `numerator / denominator` of medians."""

    numerator: Measurement
    denominator: Measurement
    label: str
    goal: str = ""

    @property
    def value(self) -> float:
        """Ratio of medians."""
        return self.numerator.median / self.denominator.median if self.denominator.median else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"ratio": round(self.value, 3), "label": self.label, **({"goal": self.goal} if self.goal else {})}

    def __str__(self) -> str:
        return f"{self.value:.2f}× ({self.label})"


@dataclass
class Context:
    """What a figure may use: quick mode (small sizes for CI), repeats, the project dir."""

    quick: bool
    repeats: int
    root: Path
    notes: list[str] = field(default_factory=list)
    use_lab: bool = True
    """False (`gpufleet bench --no-lab`): figures that need the lab skip even when a lab answers, so a run
    beside someone else's lab never drives it."""


def repeat(fn: Callable[[], Any], n: int, *, unit: str = "s", goal: str = "") -> Measurement:
    """Time `fn` n times (wall clock)."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Measurement(samples, unit, goal)


def interleave(fns: dict[str, Callable[[], Any]], n: int) -> dict[str, Measurement]:
    """Time several functions alternately (A B A B …) so machine noise hits both alike.

    The garbage one function leaves is collected before the next is timed, not during it.
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: Measurement(v) for k, v in samples.items()}


FigureFn = Callable[[Context], dict[str, Any]]


@dataclass(frozen=True)
class Figure:
    """A registered figure: number (as in the issue), title, what it means, its function."""

    key: str
    title: str
    meaning: str
    fn: FigureFn


FIGURES: list[Figure] = []


def figure(key: str, title: str, meaning: str) -> Callable[[FigureFn], FigureFn]:
    """Register a figure function."""

    def deco(fn: FigureFn) -> FigureFn:
        FIGURES.append(Figure(key, title, meaning, fn))
        return fn

    return deco


def _plain(value: Any) -> Any:
    if isinstance(value, Measurement | Ratio):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run(ctx: Context, only: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (or the selected) figure; return the JSON report."""
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": _cpus()},
        "mode": "quick" if ctx.quick else "full",
        "repeats": ctx.repeats,
        "figures": {},
    }
    started = time.perf_counter()
    for fig in sorted(FIGURES, key=lambda f: f.key):
        if only and fig.key not in only:
            continue
        log(f"== {fig.key} {fig.title}")
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"title": fig.title, "meaning": fig.meaning}
        try:
            result = fig.fn(ctx)
            entry["results"] = {k: str(v) for k, v in result.items()}
            entry["data"] = _plain(result)
            for k, v in result.items():
                log(f"   {k}: {v}")
        except Skip as exc:
            entry["skipped"] = str(exc)
            log(f"   skipped: {exc}")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["figures"][fig.key] = entry
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return report


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary written to docs/benchmarks.md (and pasted into the README)."""
    lines = [
        "# Benchmarks",
        "",
        "Written by `gpufleet bench` (reproduce: `sudo .venv/bin/gpufleet bench`; CI runs `--quick`). "
        f"Mode: {report['mode']}, repeats: {report['repeats']}, machine: {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']}, whole run {report.get('total_seconds', 0) / 60:.1f} min. "
        "Times are medians (min–max, n); ratios compare two things measured alternately in the same run, so machine "
        "noise affects both.",
        "",
        *_table(report, lambda name, goal: True),
    ]
    lines += ["", "## What each figure means", ""]
    for key, entry in report["figures"].items():
        lines.append(f"- **{key} {entry['title']}** — {entry['meaning']}")
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- bench:begin (written by `gpufleet bench --readme`; edit infra/bench, not this table) -->"
README_END = "<!-- bench:end -->"
# Rows without a goal that the README shows too: what a reader of the Performance section asks first.
HEADLINE = ("first converge", "no-op, tuned", "validate 10000", "plan 10000", "rebuild lab", "drift check", "@lab-gpu")


def readme_table(report: dict[str, Any]) -> str:
    """The README's Performance table: every figure with a goal, plus the headline rows (see HEADLINE)."""
    when = report.get("finished", "")
    lines = [
        README_BEGIN,
        f"Latest full run: {when} on {report['machine']['cpus']} CPUs, mode {report['mode']}, "
        f"{report.get('total_seconds', 0) / 60:.1f} min in all. Every row: [docs/benchmarks.md](docs/benchmarks.md).",
        "",
        *_table(report, lambda name, goal: bool(goal) or any(h in name for h in HEADLINE)),
        README_END,
    ]
    return "\n".join(lines)


def _table(report: dict[str, Any], keep: Callable[[str, str], bool]) -> list[str]:
    """Markdown table rows (# | figure | measured | goal) of the results `keep(name, goal)` selects.

    A ratio or a timing with a goal says whether it is met; skipped figures give their reason.
    """
    lines = ["| # | figure | measured | goal |", "|---|---|---|---|"]
    for key, entry in report["figures"].items():
        if "skipped" in entry:
            lines.append(f"| {key} | {entry['title']} | skipped: {entry['skipped']} | |")
            continue
        for name, text in entry["results"].items():
            data = entry["data"].get(name)
            goal = data.get("goal", "") if isinstance(data, dict) else ""
            if not keep(name, goal):
                continue
            met = ""
            value = data.get("ratio", data.get("median")) if isinstance(data, dict) else None
            if goal and value is not None:
                met = " — " + ("met" if _meets(float(value), goal) else "**not met**")
            lines.append(f"| {key} | {entry['title']}: {name} | {text}{met} | {goal} |")
    return lines


def _meets(value: float, goal: str) -> bool:
    """`≥ 2×` / `≤ 1.5×` / `≤ 15 s` style goals against a ratio or a median (in the goal's unit)."""
    import re

    m = re.match(r"\s*([≥≤])\s*([0-9.]+)", goal)
    if not m:
        return True
    bound = float(m.group(2))
    return value >= bound if m.group(1) == "≥" else value <= bound


def update_readme(readme: Path, report: dict[str, Any]) -> None:
    """Replace the marked block of the README with `readme_table(report)`."""
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no `{README_BEGIN}` … `{README_END}` block to update")
    head, rest = text.split(README_BEGIN, 1)
    readme.write_text(head + readme_table(report) + rest.split(README_END, 1)[1], encoding="utf-8")


def write(report: dict[str, Any], json_path: Path, md_path: Path | None) -> None:
    """Write the JSON report and (optionally) the Markdown summary."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(report), encoding="utf-8")
