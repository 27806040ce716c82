"""`gpufleet fingerprint`: a node's fingerprint (package versions, managed files, services, GPUs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, table
from infra.dr import fingerprint as fp
from infra.dr.rebuild import DEFAULT_RECORD_DIR
from infra.dr.remote import RemoteError, probe
from infra.dr.steps import StackRef
from infra.plan.node import plan_site


def register(sub: Any) -> None:
    """Register fingerprint."""
    p = sub.add_parser("fingerprint", help="a node's fingerprint: package versions, managed files, services, GPUs")
    add_stack_args(p)
    p.add_argument("--node", required=True)
    p.add_argument("--record", action="store_true", help="save it as the baseline a later rebuild compares with")
    p.add_argument("--records", type=Path, default=DEFAULT_RECORD_DIR)
    p.set_defaults(func=cmd_fingerprint)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Print (and optionally record) a node's fingerprint."""
    site = site_from_args(args)
    try:
        plan = plan_site(site).node(args.node)
        data = fp.fingerprint(probe(site, plan))
    except RemoteError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.UNAVAILABLE
    if args.record:
        fp.save(args.records, StackRef(args.stack, args.stack_file).name, data)

    def render(d: dict[str, Any]) -> str:
        rows = [("package", k, v or "(absent)") for k, v in d["packages"].items()]
        rows += [("file", k, v[:16]) for k, v in d["files"].items()]
        rows += [("service", k, f"{v['active']}, {v['enabled']}") for k, v in d["services"].items()]
        rows += [("gpu", g.get("index", "?"), f"{g.get('name')} {g.get('uuid')}") for g in d["gpus"]]
        return table(rows, ["kind", "item", "value"])

    emit(args.json, data, render)
    return Exit.OK
