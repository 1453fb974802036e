"""The thin CLI: ``mcmoe-vl run --check`` and ``mcmoe-vl report``; input errors are one clear line, exit code 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mcmoe_vl.cli import report as report_cli
from mcmoe_vl.cli import run as run_cli


def _main(argv: list[str]) -> int:
    """Parse with the subcommands under test (the lead wires them into mcmoe_vl.cli.SUBCOMMANDS)."""
    parser = argparse.ArgumentParser(prog="mcmoe-vl")
    sub = parser.add_subparsers(dest="command")
    run_cli.register(sub)
    report_cli.register(sub)
    args = parser.parse_args(argv)
    args.verbose = 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # what mcmoe_vl.cli.main turns into exit code 2
        print(f"mcmoe-vl {args.command}: error: {exc}")
        return 2


def test_run_check_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmodels = []\nrecipe = []\n')
    assert _main(["run", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "recipe: unknown key" in out and "models" in out


def test_run_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    data = Path(__file__).parent / "data" / "suite"
    shutil.copytree(data / "tasks", tmp_path / "tasks")
    for f in (tmp_path / "tasks").glob("*.yaml"):
        f.write_text(f.read_text().replace("DATA_DIR", str(tmp_path / "tasks")))
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "mixtral"}')
    (ck / "model.safetensors").write_bytes(b"\0")
    (tmp_path / "s.yaml").write_text(
        "name: t\nmodels: [{name: m, checkpoint: ckpt, adapter: mixtral}]\nrecipes: [{name: 16-bit}]\n"
        "tasks: [{harness: lm_eval, name: t8_parity}]\nevaluation: {lm_eval_include: [tasks]}\n")
    assert _main(["run", str(tmp_path / "s.yaml"), "--check"]) == 0
    assert "OK (1 models, 1 recipes, 1 tasks" in capsys.readouterr().out


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_report import RUN, write_all

    write_all(tmp_path / "run", RUN)
    assert _main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "mcmoe-vl report" in md and "| PMQ 2.5 |" in md
    (tmp_path / "junk.json").write_text("{}")
    assert _main(["report", str(tmp_path / "junk.json"), "-o", str(tmp_path / "rep2")]) == 2
    assert "without a 'schema' key" in capsys.readouterr().out


def test_default_suite_path_exists() -> None:
    assert run_cli.default_suite_path().is_file()
