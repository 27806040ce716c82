"""`gpufleet review --stack S --preview FILE|-`: Markdown (or JSON) change review for a pull request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit
from infra.plan.node import plan_site
from infra.review.digest import DigestError, parse
from infra.review.report import markdown, review


def register(sub: Any) -> None:
    """Register `review`."""
    p = sub.add_parser(
        "review",
        help="turn `pulumi preview --json` into a per-node change review (Markdown for a pull request)",
        description="Reads the preview digest and the stack's plan; says per node what changes "
        "(versions old → new, roles, reboots, rebuilds), what is deleted or replaced, and warns about "
        "risky operations. Exit 0 on success, 2 when the input is not a preview digest.",
    )
    add_stack_args(p)
    p.add_argument("--preview", required=True, help="file with `pulumi preview --json` output, or - for stdin")
    p.add_argument("--out", type=Path, help="write the review to this file instead of stdout")
    p.set_defaults(func=cmd_review)


def cmd_review(args: argparse.Namespace) -> int:
    """Review one preview."""
    try:
        text = sys.stdin.read() if args.preview == "-" else Path(args.preview).read_text(encoding="utf-8")
    except OSError as exc:
        sys.stderr.write(f"error: cannot read preview {args.preview}: {exc.strerror}\n")
        return Exit.INVALID
    try:
        digest = parse(text)
    except DigestError as exc:
        sys.stderr.write(f"error: {args.preview}: {exc}\n")
        return Exit.INVALID
    site = site_from_args(args)
    result = review(digest, plan_site(site), args.stack_file.stem.removeprefix("Pulumi.")
                    if args.stack_file else args.stack)
    if args.out:
        with args.out.open("w", encoding="utf-8") as fh:
            emit(args.json, result.as_dict(), lambda _: markdown(result), out=fh)
    else:
        emit(args.json, result.as_dict(), lambda _: markdown(result))
    return Exit.OK
