"""The ``mlx-intent`` group: every command listed with its one-line help, each imported only when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mlx_intent.cli.main import COMMANDS, SUMMARY_WIDTH, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_listed_summary_is_clicks_own_of_the_command(name):
    command = main.get_command(click.Context(main), name)
    assert command.name == name
    assert COMMANDS[name][2] == command.get_short_help_str(limit=SUMMARY_WIDTH)


def test_help_lists_every_command_with_its_one_line_help():
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == sorted(COMMANDS)
    for line, name in zip(listed, sorted(COMMANDS)):
        assert line.split(None, 1)[1] == COMMANDS[name][2]


def test_an_unknown_command_is_bad_usage():
    result = CliRunner().invoke(main, ["clasify", "hello"])
    assert result.exit_code == 2 and "No such command 'clasify'" in result.output


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_no_command(flag):
    """The point of the lazy group: ``--version`` and ``--help`` load no command module, numpy or MLX."""
    code = (
        "import json, sys\n"
        "from mlx_intent.cli.main import main\n"
        "try:\n"
        f"    main([{flag!r}], prog_name='mlx-intent')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    commands = {f"mlx_intent.cli.{module}" for module, _, _ in COMMANDS.values()}
    assert not loaded & commands, sorted(loaded & commands)
    assert not loaded & {"numpy", "mlx.core", "mlx_intent.chain"}, sorted(loaded & {"numpy", "mlx.core"})
