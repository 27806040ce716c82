"""`gpufleet bench`: reproduce every performance figure (outside the test run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from infra.console import Exit


def register(sub: Any) -> None:
    """Register `bench`."""
    p = sub.add_parser("bench", help="measure every performance figure; write JSON + docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (what CI runs)")
    p.add_argument("--repeats", type=int, help="repeats per timing (default 5, quick 2)")
    p.add_argument("--only", action="append", help="figure key to run (repeatable), e.g. 3")
    p.add_argument("--out", type=Path, default=Path("bench-results/report.json"), help="JSON report path")
    p.add_argument("--markdown", type=Path, help="Markdown summary path (default docs/benchmarks.md in full mode)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the harness."""
    from infra.bench import figures  # noqa: F401  (registers the figures)
    from infra.bench.harness import Context, run, write
    from infra.model.load import project_dir

    root = project_dir()
    ctx = Context(quick=args.quick, repeats=args.repeats or (2 if args.quick else 5), root=root)
    report = run(ctx, only=args.only)
    md = args.markdown or (None if args.quick else root / "docs" / "benchmarks.md")
    write(report, args.out, md)
    print(f"wrote {args.out}" + (f" and {md}" if md else ""))
    return Exit.OK
