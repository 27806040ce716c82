"""The CLI's command index: every command runs with only its own module imported."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

from infra.cli import COMMAND_MODULES, COMMANDS, build_parser


def test_index_is_what_the_modules_register() -> None:
    """Each module registers exactly the commands the index gives it (no command missing or misplaced)."""
    for module in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert set(sub.choices) == {c for c, m in COMMANDS.items() if m == module}, module


def test_help_lists_every_command() -> None:
    """Without a command (or with an unknown one) the parser knows all of them."""
    parser = build_parser(None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)


def test_validate_imports_neither_pulumi_nor_ansible_nor_the_lab() -> None:
    """`gpufleet validate` loads the model and nothing of Pulumi, Ansible, sushy or the lab."""
    code = (
        "import sys\nfrom infra.cli import main\n"
        "rc = main(['validate', '--stack', 'lab'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pulumi', 'ansible', 'ansible_runner', 'sushy',"
        " 'grafana_foundation_sdk') or m.startswith('infra.lab'))\n"
        "print(rc, bad)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip().splitlines()[-1] == "0 []", p.stdout + p.stderr
