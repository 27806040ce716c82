"""Core install: without the `lab` extra every non-lab command works and `gpufleet lab` exits 5.

scripts/check-core-install.sh proves it with a real venv of only the core dependencies (CI); this test
is the fast guard: a fresh interpreter in which the lab-only packages cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Packages only the `lab` extra brings (pyproject.toml [project.optional-dependencies] lab, and theirs).
LAB_ONLY = ("numpy", "gguf", "sushy_tools", "bcrypt")

_BLOCK = textwrap.dedent(
    f"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {LAB_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Block())
    from infra.cli import main
    """
)


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "GPUFLEET_RUNS_DIR": str(tmp_path / "runs")},
        check=False,
    )


def test_parser_and_non_lab_commands_need_no_lab_package(tmp_path: Path) -> None:
    p = _run(
        """
        import sys
        from infra.cli import build_parser
        build_parser()
        assert main(["validate", "--stack", "lab"]) == 0
        assert main(["plan", "--stack", "lab", "--json"]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "gguf", "sushy_tools"))
        assert not loaded, loaded
        """,
        tmp_path,
    )
    assert p.returncode == 0, p.stderr


def test_lab_command_without_the_extra_exits_5_naming_the_fix(tmp_path: Path) -> None:
    p = _run('sys.exit(main(["lab", "status", "--stack", "lab"]))'.replace("sys.", "__import__('sys')."), tmp_path)
    assert p.returncode == 5, p.stderr
    assert p.stderr.startswith("error: `gpufleet lab` needs the Python package")
    assert "install the lab extra" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.splitlines()) == 1
