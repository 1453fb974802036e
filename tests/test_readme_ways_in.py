"""The README's three ways in (Python, the command line, the harness command lines) run as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- ways-in:{name} -->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no ways-in:{name} block"
    return m.group(1)


def commands(block: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    for d in ("embedded", "tasks"):
        (tmp_path / d).symlink_to(ROOT / d, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_block_runs(workdir, capsys):
    block = readme_block("python")
    assert len([ln for ln in block.splitlines() if ln.strip()]) <= 10
    exec(compile(block, "README.md:ways-in:python", "exec"), {})
    out = capsys.readouterr().out
    assert "effective_bits" in out and "+-" in out
    assert json.loads((workdir / "runs/mixtral-tiny-2.5b/config.json").read_text())["quantization_config"]


def test_cli_and_harness_blocks_run(workdir, capsys):
    from mcmoe_vl.cli import main

    for argv in commands(readme_block("cli")):
        assert argv[0] == "mcmoe-vl"
        assert main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "mcmoe_docstring_cloze" in out and "acc" in out  # the harness's table
    for argv in commands(readme_block("harness")):
        if argv[0] == "mcmoe-vl":
            assert main(argv[1:]) == 0, argv
            continue
        assert argv[:3] == ["python", "-m", "mcmoe_vl.evaluation.harness"]
        env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PATH": "/usr/bin:/bin", "HOME": str(workdir)}
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "mcmoe_docstring_cloze" in proc.stdout
    assert list((workdir / "runs/w/lm_eval").rglob("results*.json"))
