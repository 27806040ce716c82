"""Read perftest's reports (`ib_write_bw`, `ib_write_lat`): the figures of a pairwise fabric test.

The layout is perftest's own (linux-rdma/perftest `src/perftest_parameters.h`, commit 00b55b6):
`RESULT_FMT_G` / `RESULT_FMT` header lines then `REPORT_FMT` rows for bandwidth (Gb/s with
`--report_gbits`, MiB/s otherwise), `RESULT_FMT_LAT` then `REPORT_FMT_LAT` for latency. Rows are
whitespace-separated numbers; the header says which unit the bandwidth is in.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIB_PER_S_IN_GBPS = 1024 * 1024 * 8 / 1e9
"""perftest's MiB/s (2^20 bytes) in Gb/s (10^9 bits)."""


class PerftestError(ValueError):
    """The output has no report row (the test failed before measuring): carries perftest's last words."""


@dataclass(frozen=True)
class Bandwidth:
    """One `ib_write_bw` report row."""

    message_bytes: int
    iterations: int
    peak_gbps: float
    average_gbps: float
    msg_rate_mpps: float


@dataclass(frozen=True)
class Latency:
    """One `ib_write_lat` report row (microseconds)."""

    message_bytes: int
    iterations: int
    min_us: float
    max_us: float
    typical_us: float
    average_us: float
    stdev_us: float
    p99_us: float
    p999_us: float


def _rows_after(text: str, marker: str) -> tuple[str, list[list[str]]]:
    """The header line containing `marker` and the numeric rows that follow it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            rows = []
            for row in lines[i + 1 :]:
                words = row.split()
                if not words or not words[0].isdigit():
                    break
                rows.append(words)
            return line, rows
    return "", []


def _last_words(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("---")]
    return lines[-1] if lines else "no output"


def parse_bandwidth(text: str) -> Bandwidth:
    """The last report row of `ib_write_bw` output, bandwidth in Gb/s whichever unit perftest printed."""
    header, rows = _rows_after(text, "BW average[")
    if not rows:
        raise PerftestError(f"no bandwidth report: {_last_words(text)}")
    w = rows[-1]
    scale = 1.0 if "Gb/sec" in header else _MIB_PER_S_IN_GBPS
    return Bandwidth(int(w[0]), int(w[1]), float(w[2]) * scale, float(w[3]) * scale, float(w[4]))


def parse_latency(text: str) -> Latency:
    """The last report row of `ib_write_lat` output."""
    _, rows = _rows_after(text, "t_typical[usec]")
    if not rows:
        raise PerftestError(f"no latency report: {_last_words(text)}")
    w = rows[-1]
    return Latency(int(w[0]), int(w[1]), *(float(x) for x in w[2:9]))
