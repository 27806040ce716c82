"""`gpufleet bench`: reproduce every performance figure (outside the test run)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from infra.console import Exit


def register(sub: Any) -> None:
    """Register `bench`."""
    p = sub.add_parser("bench", help="measure every performance figure; write JSON + docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (what CI runs)")
    p.add_argument("--no-lab", action="store_true",
                   help="skip the figures that drive the lab even when a lab answers (it may be someone else's)")
    p.add_argument("--repeats", type=int, help="repeats per timing (default 5, quick 2)")
    p.add_argument("--only", action="append", help="figure key to run (repeatable), e.g. 3")
    p.add_argument("--out", type=Path, default=Path("bench-results/report.json"), help="JSON report path")
    p.add_argument("--markdown", type=Path, help="Markdown summary path (default docs/benchmarks.md in full mode)")
    p.add_argument("--readme", action="store_true",
                   help="also rewrite the README's Performance table (default in full mode without --only)")
    p.add_argument("--from-report", type=Path, metavar="JSON",
                   help="measure nothing: write the Markdown (and --readme table) from an earlier JSON report")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the harness."""
    from infra.bench import figures  # noqa: F401  (registers the figures)
    from infra.bench.harness import Context, run, update_readme, write
    from infra.model.load import project_dir

    root = project_dir()
    if args.from_report:
        report = json.loads(args.from_report.read_text(encoding="utf-8"))
        mtime = time.gmtime(args.from_report.stat().st_mtime)
        report.setdefault("finished", time.strftime("%Y-%m-%d %H:%M UTC", mtime))
        args.out = args.from_report
    else:
        ctx = Context(
            quick=args.quick, repeats=args.repeats or (2 if args.quick else 5), root=root, use_lab=not args.no_lab
        )
        report = run(ctx, only=args.only)
    full = report["mode"] == "full"
    md = args.markdown or (root / "docs" / "benchmarks.md" if full else None)
    write(report, args.out, md)
    print(f"wrote {args.out}" + (f" and {md}" if md else ""))
    if args.readme or (full and not args.only and not args.from_report):
        update_readme(root / "README.md", report)
        print(f"updated the Performance table of {root / 'README.md'}")
    return Exit.OK
