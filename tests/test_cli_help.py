"""The command line's help: plain text, defaults shown, --version, and every example in it is a valid command."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from mcmoe_vl import __version__
from mcmoe_vl.cli import PASSTHROUGH, SUBCOMMANDS, build_parser, main
from mcmoe_vl.cli.common import examples, plain

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "embedded" / "mixtral-tiny"


def _help(name: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_is_plain_text_with_defaults(name, capsys):
    text = _help(name, capsys)
    assert "``" not in text and not re.search(r":(func|class|mod|meth):", text), text
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[name]
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            options = text[text.index("options:"):]
            entry = re.search(rf"\n  {re.escape(action.option_strings[0])}\b(.*?)(?=\n  -|\Z)", options, re.S)
            assert entry and "default" in entry.group(1), f"{name} {action.option_strings}: default not shown"


def test_plain_strips_markup():
    assert plain("see :func:`mcmoe_vl.x.y` and ``--plan``") == "see mcmoe_vl.x.y and --plan"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"mcmoe-vl {__version__}"


def _example_argv(line: str) -> list[str]:
    """The example as argv: a trailing comment dropped, optional parts kept (the first of `a | b` alternatives),
    and the first of `x|y` choices."""
    line = re.sub(r"\s+#.*$", "", line)
    line = re.sub(r"\[([^\]]*)\]", lambda m: " " + m.group(1).split(" | ")[0] + " ", line)
    argv = shlex.split(line)[1:]
    return [a.split("|")[0] if "|" in a and not a.startswith("embedded:") else a for a in argv]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_example_in_the_help_is_a_valid_command(name):
    doc = importlib.import_module(f"mcmoe_vl.cli.{name}").__doc__
    joined = re.sub(r"\\\n\s*", " ", doc or "")  # continued lines
    for line in examples(joined):
        argv = _example_argv(line)
        assert argv[0] == name, line
        if "--" in argv:  # what follows goes to the wrapped tool, as main() splits it
            assert name in PASSTHROUGH, line
            argv = argv[:argv.index("--")]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse rejects unknown options and bad choices this way
            pytest.fail(f"example in `mcmoe-vl {name} --help` is not a valid command: {line} ({exc})")


def test_hf_data_works_in_the_cli(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": "def f(x):\n    return x * 2\n" * 20}] * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "stats.json"
    rc = main(["calibrate", str(EMBEDDED), "--data", "hf:some/corpus:en:validation", "-o", str(out),
               "--num-sequences", "1", "--seq-len", "64", "--eps-bits", "--no-progress"])
    assert rc == 0 and out.is_file()
    assert calls == [("some/corpus", "en", "validation", True)]


def test_bad_hf_spec_is_a_clear_error(tmp_path, capsys):
    rc = main(["calibrate", str(EMBEDDED), "--data", "hf:", "-o", str(tmp_path / "s.json"), "--no-progress"])
    assert rc == 2 and "hf:<dataset>" in capsys.readouterr().err
