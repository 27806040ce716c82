"""The figures the issues name. Each area's measuring code lives with the area; this module wires them up."""

from __future__ import annotations

from typing import Any

from infra.bench.harness import Context, figure, repeat


@figure(
    "3",
    "Validation and planning of a generated 10,000-node site",
    "Wall time to validate (pydantic + every cross-field rule) and plan (per-node roles, packages, VRAM fit) a "
    "generated site of 10,000 8-GPU nodes — what `gpufleet validate`/`plan` and the Pulumi program pay before "
    "registering any resource. Quick mode uses 1,000 nodes.",
)
def validation_and_planning(ctx: Context) -> dict[str, Any]:
    """Validate and plan a generated site."""
    from infra.model.generate import generate_site
    from infra.model.load import parse_site
    from infra.plan.node import plan_site

    n = 1_000 if ctx.quick else 10_000
    raw = generate_site(n)
    site = parse_site(raw)
    validate = repeat(lambda: parse_site(raw), ctx.repeats)
    plan = repeat(lambda: plan_site(site), ctx.repeats)
    return {
        f"validate {n} nodes": validate,
        f"plan {n} nodes": plan,
        "per node (validate + plan)": f"{(validate.median + plan.median) / n * 1e6:.0f} µs",
    }
