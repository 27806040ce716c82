"""Turn the JSON a step prints into stack outputs, without failing the program on odd output."""

from __future__ import annotations

import json
from typing import Any


def parse_json_stdout(stdout: str | None, what: str) -> dict[str, Any]:
    """The JSON object a `--json` command printed, or `{"error": ...}` saying what was wrong."""
    if not stdout:
        return {"error": f"{what} printed nothing"}
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        # Keep the program going (outputs are informational); say what arrived so the user can look.
        return {"error": f"{what} did not print JSON", "stdout_head": stdout[:200]}
    return data if isinstance(data, dict) else {"value": data}
