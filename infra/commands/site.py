"""Commands on the site model: validate, plan, schema, vram."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from infra.bundle.lock import lock_path, lock_path_for, require_locked_images
from infra.console import Exit, emit, fail, fraction, positive_float, positive_int, table
from infra.model import sizing
from infra.model.catalogue import resolve
from infra.model.load import SiteError, load_site, project_dir
from infra.model.site import DType, KvCacheDType, Site
from infra.plan.desired import DesiredState
from infra.plan.fabric import serves_endpoint
from infra.plan.node import NodePlan, plan_site


def add_stack_args(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """`--stack NAME` / `--stack-file PATH` (and `--json`) shared by every stack command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stack", default="lab", help="stack name: stacks/Pulumi.<NAME>.yaml (default: lab)")
    g.add_argument("--stack-file", type=Path, help="path of a stack file instead of a stack name")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def site_from_args(args: argparse.Namespace) -> Site:
    """Load and validate the site the arguments name (raises SiteError with all problems)."""
    return load_site(stack=args.stack, path=args.stack_file)


def register(sub: Any) -> None:
    """Register validate, plan, schema and vram."""
    p = sub.add_parser("validate", help="validate a stack file: every problem, with its config path and fix")
    add_stack_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="per-node desired state: roles, pinned versions, reboot policy, VRAM fit")
    add_stack_args(p)
    p.add_argument("--node", help="only this node")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("schema", help="write the JSON Schema of `gpufleet:site` (for editors)")
    p.add_argument("--out", type=Path, help="file to write (default: docs/schema/site.schema.json; - for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the model")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("vram", help="does a model fit: weights, KV cache, max tokens, smallest change to fit")
    p.add_argument("--model", help="catalogue model name (e.g. llama-3.1-70b)")
    for flag, typ in (
        ("--params", positive_float),
        ("--layers", positive_int),
        ("--heads", positive_int),
        ("--kv-heads", positive_int),
        ("--head-dim", positive_int),
        ("--vocab", positive_int),
    ):
        p.add_argument(flag, type=typ, help="explicit architecture (overrides the catalogue entry)")
    p.add_argument("--gpu", default="H100", help="catalogue GPU (default H100); see --gpu-memory-gib for others")
    p.add_argument("--gpu-memory-gib", type=positive_float, metavar="GIB",
                   help="total memory CUDA reports for a GPU outside the catalogue (vLLM's total_gpu_memory); "
                        "non-torch memory then takes the planner's default")
    p.add_argument("--max-num-batched-tokens", type=positive_int,
                   help="tokens of vLLM's profile batch (default: vLLM V1's default for the GPU's memory)")
    p.add_argument("--max-num-seqs", type=positive_int,
                   help="rows of vLLM's profile sampler step (default: --concurrency, as gpufleet passes it)")
    p.add_argument("--count", type=positive_int, help="GPUs on the node (default: tp × pp)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline parallel size")
    p.add_argument("--dtype", default="bf16", choices=[d.value for d in DType])
    p.add_argument("--kv-dtype", default="auto", choices=[d.value for d in KvCacheDType])
    p.add_argument("--utilization", type=fraction, default=0.9, help="GPU memory share to use, in (0, 1]")
    p.add_argument("--context", type=positive_int, default=8192, help="context length in tokens")
    p.add_argument("--concurrency", type=positive_int, default=1, help="sequences served at once")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vram)


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate; exit 0 when valid, 2 with every problem otherwise."""
    try:
        site = site_from_args(args)
        # Nodes to be network-installed need their OS image in the stack's lock (issue 20).
        require_locked_images(site, lock_path_for(args.stack_file) if args.stack_file else lock_path(args.stack))
    except SiteError as exc:
        data = {
            "valid": False,
            "source": exc.source,
            "problems": [p.as_dict() for p in exc.problems],
            # The fields every failing command has under --json (infra.console.fail).
            "error": f"{exc.source}: {len(exc.problems)} problem(s)",
            "exit": int(Exit.INVALID),
        }
        if args.json:
            emit(True, data, str)
        else:
            sys.stderr.write(str(exc) + "\n")
        return Exit.INVALID
    data = {
        "valid": True,
        "site": site.name,
        "nodes": len(site.nodes),
        "segments": len(site.segments),
        "services": len(site.services),
    }
    emit(
        args.json,
        data,
        lambda d: f"{d['site']}: valid ({d['nodes']} nodes, {d['segments']} segments, {d['services']} services)",
    )
    return Exit.OK


def node_plan_dict(n: NodePlan) -> dict[str, Any]:
    """JSON form of a node plan."""
    return {
        "hostname": n.hostname,
        "address": str(n.node.address),
        "segment": n.segment.name,
        "airgapped": n.segment.airgapped,
        "batch": n.batch,
        "profile": n.profile_name,
        "roles": list(n.roles),
        "reboot_policy": n.reboot_policy.value,
        "packages": [{"name": p.name, "version": p.version, "component": p.component.value} for p in n.packages],
        "summary": DesiredState.of(n).summary(),
        "services": [
            {
                "name": s.name,
                "engine": s.service.engine.value,
                "model": s.service.model.name,
                "endpoint": f"http://{n.node.address}:{s.service.port}/v1",
                "vram": s.vram.as_dict() if s.vram else None,
            }
            for s in n.services
            # A spanning service's worker runs only its RPC backend: its endpoint is the head's.
            if serves_endpoint(s.span, n.hostname)
        ],
    }


def _render_plan(data: dict[str, Any]) -> str:
    out = []
    for n in data["nodes"]:
        out.append(
            f"{n['hostname']}  segment={n['segment']}{' (air-gapped)' if n['airgapped'] else ''}  "
            f"batch={n['batch']}  profile={n['profile']}  reboot={n['reboot_policy']}"
        )
        out.append(f"  roles: {', '.join(n['roles'])}")
        out.append(
            "  "
            + table(
                [(p["component"], p["name"], p["version"]) for p in n["packages"]], ["component", "package", "version"]
            ).replace("\n", "\n  ")
        )
        if n["services"]:
            rows = []
            for s in n["services"]:
                v = s["vram"]
                rows.append(
                    (
                        s["name"],
                        s["engine"],
                        s["model"],
                        *(
                            ("-", "-", "-", "-", "n/a (llama.cpp)")
                            if v is None
                            else (
                                f"{v['weights_gib']:.1f}",
                                f"{v['kv_cache_gib']:.1f}",
                                v["max_tokens"],
                                v["required_tokens"],
                                "fits" if v["fits"] else "DOES NOT FIT",
                            )
                        ),
                    )
                )
            out.append(
                "  "
                + table(
                    rows,
                    ["service", "engine", "model", "weights GiB/GPU", "KV GiB/GPU", "max tokens", "needed", "verdict"],
                ).replace("\n", "\n  ")
            )
        out.append("")
    return "\n".join(out)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the per-node plan."""
    plan = plan_site(site_from_args(args))
    nodes = [plan.node(args.node)] if args.node else list(plan.nodes)
    emit(args.json, {"site": plan.site.name, "nodes": [node_plan_dict(n) for n in nodes]}, _render_plan)
    return Exit.OK


def schema_text() -> str:
    """The JSON Schema of the `gpufleet:site` object, deterministic."""
    schema = Site.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gpufleet:site"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def stack_file_schema(site_schema: dict[str, Any]) -> dict[str, Any]:
    """Schema of a whole stack file: `config:` with `gpufleet:site` checked, other keys free."""
    defs = site_schema.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gpufleet stack file (stacks/Pulumi.<stack>.yaml)",
        "type": "object",
        "properties": {
            "encryptionsalt": {"type": "string"},
            "secretsprovider": {"type": "string"},
            "encryptedkey": {"type": "string"},
            "config": {"type": "object", "properties": {"gpufleet:site": site_schema}, "required": ["gpufleet:site"]},
        },
        "additionalProperties": False,
        "$defs": defs,
    }


def cmd_schema(args: argparse.Namespace) -> int:
    """Write (or check) docs/schema/site.schema.json."""
    text = json.dumps(stack_file_schema(json.loads(schema_text())), indent=2, sort_keys=True) + "\n"
    out = args.out or project_dir() / "docs" / "schema" / "site.schema.json"
    if str(out) == "-":
        sys.stdout.write(text)
        return Exit.OK
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            return fail(args, Exit.FAILED, f"{out} is out of date: run `gpufleet schema`")
        return Exit.OK
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {out}\n")
    return Exit.OK


def cmd_vram(args: argparse.Namespace) -> int:
    """Plan GPU memory for a catalogue model or an explicit architecture; report every term."""
    cat = resolve()
    base = cat.models.get(args.model) if args.model else None
    if args.model and base is None:
        return fail(args, Exit.INVALID, f"unknown model {args.model!r}; known: {', '.join(sorted(cat.models))}")
    gpu = cat.gpus.get(args.gpu)
    if gpu is None and args.gpu_memory_gib is None:
        return fail(args, Exit.INVALID, f"unknown GPU {args.gpu!r}; known: {', '.join(sorted(cat.gpus))} "
                                        "(or give its memory with --gpu-memory-gib)")
    explicit = {
        "parameters": args.params,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab": args.vocab,
    }
    if base is not None and all(v is None for v in explicit.values()):
        arch = sizing.architecture(base)
    else:
        values = {k: v if v is not None else (getattr(base, k) if base else None) for k, v in explicit.items()}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            return fail(args, Exit.INVALID, f"give --model or the architecture; missing: {flags}")
        arch = sizing.Architecture(**values)  # type: ignore[arg-type]
    count = args.count or args.tp * args.pp
    memory = args.gpu_memory_gib if args.gpu_memory_gib is not None else gpu.usable_gib  # type: ignore[union-attr]
    # A GPU given by its memory is not the catalogue's GPU of that name: its non-torch figures are unknown.
    base_nt, tp_nt = sizing.non_torch(gpu if args.gpu_memory_gib is None else None)
    dep = sizing.Deployment(
        gpu=args.gpu,
        gpu_usable_gib=memory,
        gpu_count=count,
        dtype=DType(args.dtype),
        kv_cache_dtype=KvCacheDType(args.kv_dtype),
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        utilization=args.utilization,
        context_length=args.context,
        concurrency=args.concurrency,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        non_torch_gib=base_nt,
        non_torch_tp_gib=tp_nt,
    )
    result = sizing.plan(arch, dep)

    def render(d: dict[str, Any]) -> str:
        kv = (f"{d['kv_cache_gib']:.2f} GiB" if d["over_budget_gib"] == 0
              else f"none: the terms above exceed the budget by {d['over_budget_gib']:.2f} GiB")
        rows = [
            ("GPU", f"{count}x {args.gpu} ({d['total_gib']:g} GiB total as CUDA reports it)"),
            ("budget per GPU",
             f"{d['budget_gib']:.2f} GiB (total × {args.utilization:.2f}; KV cache = budget − the next three)"),
            ("weights per GPU", f"{d['weights_gib']:.2f} GiB ({args.dtype})"),
            ("activation peak", f"{d['activation_gib']:.2f} GiB (profile: {d['profile_tokens']} tokens, "
                                  f"{d['profile_seqs']} sampler rows)"),
            ("non-torch memory", f"{d['non_torch_gib']:.2f} GiB"),
            ("KV cache per GPU", kv),
            ("KV bytes per token", f"{d['kv_bytes_per_token']} ({d['kv_bytes_per_token'] / 1024:.0f} KiB; "
                                   f"{d['kv_bytes_per_token_per_gpu'] / 1024:.0f} KiB per GPU)"),
            ("max tokens", d["max_tokens"]),
            ("max sequences at context", d["max_sequences"]),
            ("verdict", d["verdict"]),
        ]
        return table(rows, ["figure", "value"])

    emit(args.json, result.as_dict(), render)
    return Exit.OK if result.fits else Exit.FAILED
