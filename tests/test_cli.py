"""The command line's dispatch: one table says which module registers each command."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from medfs.cli import main


def registered(module: str) -> set[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"medfs.cli.{module}").register(sub, main.common_options())
    return set(sub.choices)


@pytest.mark.parametrize("module", main.COMMAND_MODULES)
def test_the_table_names_exactly_what_each_module_registers(module: str) -> None:
    assert registered(module) == {cmd for cmd, mod in main.COMMANDS.items() if mod == module}


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_command_that_does_not_mount_never_imports_pyfuse3_or_trio() -> None:
    done = run(
        "import sys\n"
        "from medfs.cli import main\n"
        "try:\n    main.main(['share', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('pyfuse3', 'trio', 'medfs.fs') if m in sys.modules))\n"
    )
    assert done.returncode == 0, done.stderr
    assert "--to NAME.pub" in done.stdout
    assert done.stdout.strip().endswith("[]")


def test_top_level_help_lists_every_command() -> None:
    help_text = main.build_parser().format_help()
    for command in main.COMMANDS:
        assert command in help_text


def test_an_unknown_command_is_refused_with_the_list_of_commands() -> None:
    done = run("from medfs.cli import main\nmain.main(['mnt', '/x'])")
    assert done.returncode == 2
    assert "invalid choice: 'mnt'" in done.stderr
    assert "mount" in done.stderr
