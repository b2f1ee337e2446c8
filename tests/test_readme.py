"""The README's examples, run: every ``$ mlx-intent ...`` line with the answer printed under it, and every
``curl`` to /v1/classify with a ``# {...}`` answer under it, through the default chain (issue 24, part 6).

Intents (and ``context_used``) are checked, never confidences: a retrained tier moves them, and the README
says which intents a traveller gets, so it cannot drift from what the program prints."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_server import post, running, wait_ready

from mlx_intent.chain import build_chain
from mlx_intent.cli.main import main
from mlx_intent.serve.app import create_app
from mlx_intent.settings import load_settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
CURL = re.compile(r"curl -s localhost:8765(/v1/classify(?:/batch)?) .*-d '(.*)'$")

pytestmark = pytest.mark.usefixtures("clean_settings", "models_home")  # conftest: no stray settings; no LLM


def lines() -> list[str]:
    """The README's lines, with shell continuations (a trailing backslash) joined."""
    return README.replace("\\\n", " ").splitlines()


def console_examples() -> list[tuple[str, dict]]:
    """(command, printed answer) of every ``$ mlx-intent`` line followed by the JSON it prints."""
    found = lines()
    return [(line[2:], json.loads(found[i + 1])) for i, line in enumerate(found[:-1]) if line.startswith("$ mlx-")]


def curl_examples() -> list[tuple[str, dict, dict]]:
    """(path, body, expected) of every curl to /v1/classify followed by a ``# {...}`` answer: the intents and
    ``context_used`` its comment shows (the first result's, for a batch)."""
    found, out = lines(), []
    for i, line in enumerate(found[:-1]):
        match, shown = CURL.search(line.strip()), found[i + 1]
        if match is None or not shown.startswith("# {"):
            continue
        expected = {"primary_intent": re.search(r'"primary_intent":"(\w+)"', shown).group(1)}
        if (used := re.search(r'"context_used":(true|false)', shown)) is not None:
            expected["context_used"] = used.group(1) == "true"
        out.append((match.group(1), json.loads(match.group(2)), expected))
    return out


def test_the_readme_has_examples_to_check():
    assert len(console_examples()) >= 1 and len(curl_examples()) >= 5


@pytest.mark.parametrize("command, printed", console_examples(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_console_example_prints_the_intents_shown(command, printed):
    words = shlex.split(command)
    assert words[0] == "mlx-intent"
    result = CliRunner().invoke(main, words[1:])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert list(got) == list(printed)
    assert (got["primary_intent"], got["all_intents"]) == (printed["primary_intent"], printed["all_intents"])


def test_the_curl_examples_answer_the_intents_shown():
    """In README order, through one server (the session examples build on each other)."""
    settings = load_settings()
    app = create_app(settings, build_chain(settings))
    with running(app) as (base, _):
        wait_ready(base)
        for path, body, expected in curl_examples():
            got = post(base, path, body).json()
            got = got["results"][0] if path.endswith("/batch") else got
            assert {k: got[k] for k in expected} == expected, body
