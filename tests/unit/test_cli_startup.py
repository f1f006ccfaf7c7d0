"""Start-up of `taskrun`: a command imports only what it uses (cli/main.py's stand-in parsers), with the
same parser, help and completion as the complete tree."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from taskrunner.cli import main as cli_main
from taskrunner.cli.examples import walk

#: Libraries that cost most of a start-up; no command that does not use them may load them.
HEAVY = ("rich", "yaml", "cryptography", "git", "paramiko", "prometheus_client", "watchdog", "shtab")


def loaded_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after a fresh interpreter ran `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(proc.stdout.splitlines()[-1]))


def help_text(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main.main([*argv, "--help"])
    return out.getvalue()


def test_version_loads_no_heavy_library() -> None:
    loaded = loaded_after("from taskrunner.cli.main import main\ntry:\n    main(['--version'])\n"
                          "except SystemExit:\n    pass")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_daemon_module_loads_neither_ssh_nor_metrics_nor_http_server() -> None:
    loaded = loaded_after("import taskrunner.daemon")
    assert not loaded & {"paramiko", "invoke", "prometheus_client", "shtab"}, loaded



def test_reading_records_loads_no_cryptography() -> None:
    # Every `taskrun status` reads sealed records: the record key (recordkey.py) needs only hmac.
    loaded = loaded_after("import taskrunner.records, taskrunner.record_index")
    assert "cryptography" not in loaded, loaded

def test_lazy_commands_are_exactly_those_their_modules_define() -> None:
    parser = cli_main.build_parser(complete=False)
    (commands,) = [a for a in parser._actions if isinstance(a, cli_main._Commands)]
    assert set(commands.stand_ins) == {n for names in cli_main.LAZY_COMMANDS.values() for n in names}
    before = set(commands.choices)
    commands.load_all()
    assert not commands.stand_ins and set(commands.choices) == before


def test_every_help_is_the_same_through_stand_ins_as_from_the_complete_parser() -> None:
    complete = cli_main.build_parser()
    for path, each in walk(complete):
        if path:  # main() parses with stand-ins: each command loads its module when chosen
            assert help_text(list(path)) == each.format_help(), path
    top = io.StringIO()
    with contextlib.redirect_stdout(top), pytest.raises(SystemExit):
        cli_main.main(["--help"])
    assert top.getvalue() == complete.format_help()


def test_complete_parser_lists_commands_in_help_order() -> None:
    parser = cli_main.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, cli_main._Commands)]
    listed = [a.dest for a in commands._choices_actions]
    assert listed == list(commands.choices)
    assert listed.index("submit") < listed.index("cancel") < listed.index("worker") < listed.index("trigger")
