"""`gpufleet review --stack S --preview FILE|-`: Markdown (or JSON) change review for a pull request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, fail
from infra.plan.node import plan_site
from infra.review.digest import MAX_BYTES, Digest, DigestError, parse
from infra.review.report import FAIL_ON, markdown, plain, review


def _fail_on(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in FAIL_ON]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'}: choose from {','.join(FAIL_ON)}")
    return parts


def register(sub: Any) -> None:
    """Register `review`."""
    p = sub.add_parser(
        "review",
        help="turn `pulumi preview --json` into a per-node change review (Markdown for a pull request)",
        description="Reads the preview digest and the stack's plan; says per node what changes and why "
        "(trigger key old → new, `dir`, a provider upgrade), lists every reinstall, reboot and removal. "
        "Exit 0; 1 when the preview failed or did not finish (the review is still written); 2 when the "
        "input is not a preview digest; 3 when --fail-on names a kind of change the review contains.",
    )
    add_stack_args(p)
    p.add_argument("--preview", required=True, help="file with `pulumi preview --json` output, or - for stdin")
    p.add_argument("--out", type=Path, help="write the review to this file instead of stdout")
    p.add_argument("--fail-on", type=_fail_on, default=(), metavar="reinstall,reboot[,remove]",
                   help="exit 3 when the review contains these kinds of change (CI: demand an extra approval)")
    p.set_defaults(func=cmd_review)


def _read(source: str) -> bytes:
    # Read one byte past the limit so parse() can refuse an over-long input without holding more.
    if source == "-":
        return sys.stdin.buffer.read(MAX_BYTES + 1)
    with Path(source).open("rb") as fh:
        return fh.read(MAX_BYTES + 1)


def _first_error(digest: Digest) -> str:
    if not digest.complete and not digest.errors:
        return "the preview did not finish (no change summary: cancelled or crashed)"
    lines = [ln.strip() for ln in digest.errors[0].message.splitlines() if ln.strip()] or ["(no message)"]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return f"the preview failed: {plain(text, 400)}"


def cmd_review(args: argparse.Namespace) -> int:
    """Review one preview."""
    try:
        raw = _read(args.preview)
    except OSError as exc:
        return fail(args, Exit.INVALID, f"cannot read preview {plain(args.preview)}: {exc.strerror or exc}")
    if not raw.strip():
        return fail(args, Exit.FAILED, f"{plain(args.preview)} is empty: the preview wrote no digest, so it "
                    "failed before the engine ran — see the output of `pulumi preview` on stderr")
    try:
        digest = parse(raw)
    except DigestError as exc:
        return fail(args, Exit.INVALID, f"{plain(args.preview)}: {plain(str(exc), 400)}")
    site = site_from_args(args)
    stack = args.stack_file.stem.removeprefix("Pulumi.") if args.stack_file else args.stack
    result = review(digest, plan_site(site), stack)
    try:
        if args.out:
            with args.out.open("w", encoding="utf-8") as fh:
                emit(args.json, result.as_dict(), lambda _: markdown(result), out=fh)
        else:
            emit(args.json, result.as_dict(), lambda _: markdown(result))
    except OSError as exc:
        return fail(args, Exit.INVALID, f"cannot write the review to {plain(str(args.out))}: {exc.strerror or exc}")
    if result.failed:
        # The review is written anyway (it says the preview failed); CI must not pass it.
        sys.stderr.write(f"error: {_first_error(digest)}\n")
        return Exit.FAILED
    hit = [c for c in args.fail_on if c in result.attention]
    if hit:
        sys.stderr.write(f"review: this change needs an extra approval: it contains {', '.join(hit)} "
                         f"(--fail-on {','.join(args.fail_on)})\n")
        return Exit.DRIFT
    return Exit.OK
