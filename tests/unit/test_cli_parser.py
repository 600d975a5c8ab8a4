"""`nodeagent COMMAND ...` parses with only COMMAND's module when it is named like it
(nodeagent.commands.run for `run`): same namespace, same help, same errors as the full parser."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from nodeagent import cli

ARGVS = [
    ["run"],
    ["-v", "run", "--capture", "none", "--access-log"],
    ["--verbose", "run", "--node", "n1", "--metrics", "127.0.0.1:1"],
    ["ca", "init", "--dir", "/tmp/x"],
    ["proxy", "--help"],
    ["run", "--help"],
    ["run", "--capture", "bogus"],
    ["run", "--no-such-flag"],
    ["enroll", "--netns", "x", "--name", "a", "--namespace", "b"],   # defined in run.py: full parser
    ["validate", "x.yaml"],
    ["-h"],
    ["nosuch"],
    [],
]


def outcome(parser, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = vars(parser.parse_args(argv))
            ns["func"] = getattr(ns.get("func"), "__qualname__", None)
            code = None
        except SystemExit as exc:
            ns, code = None, exc.code
    return ns, code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a) or "(none)")
def test_same_result_as_the_full_parser(argv):
    assert outcome(cli._parser_for(argv), argv) == outcome(cli.build_parser(), argv)


def test_only_the_commands_module_for_a_module_named_command():
    parser, sub = cli._build(["nodeagent.commands.run"])
    assert cli._parser_for(["-v", "run"]).format_usage() == parser.format_usage()
    assert "run" in sub.choices and "explain" not in sub.choices
    assert cli._parser_for(["enroll"]).format_help() == cli.build_parser().format_help()


def test_run_does_not_import_the_other_command_modules():
    code = ("import sys, nodeagent.cli as cli; cli._parser_for(['run']).parse_args(['run']); "
            "print(sorted(m for m in sys.modules if m.startswith('nodeagent.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['nodeagent.commands.run']"
