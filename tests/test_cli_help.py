"""Help texts and versions (issue 15 D): every option of every ``nfknock``
subcommand says what it does and what it defaults to."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

from nfknock import __version__
from nfknock.cli import _parser
from nfknock_client.cli import main as client_main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_has_a_help_line() -> None:
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helped = {c.dest for c in sub._choices_actions if c.help}
    assert helped == set(sub.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_that_shows_its_default(command: str) -> None:
    parser = subcommands()[command]
    text = parser.format_help()
    one_of_required = {
        a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions
    }
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        if action.help == argparse.SUPPRESS:  # internal (run --worker: the supervisor's)
            continue
        name = action.option_strings[-1]
        assert action.help, f"nfknock {command} {name} has no help text"
        flag = action.nargs == 0
        if not flag and not action.required and action not in one_of_required:
            shown = parser._get_formatter()._expand_help(action)
            assert "default" in shown, f"nfknock {command} {name}: no default in {shown!r}"
    assert "default: None" not in text


def test_nfknock_version_is_the_installed_distributions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"nfknock {__version__}"
    assert version("nfknock") == __version__


def test_nfknock_client_has_a_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        client_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"nfknock-client {__version__}"
