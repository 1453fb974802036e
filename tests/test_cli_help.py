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


@pytest.mark.slow
def test_eval_and_export_help_examples_run(tmp_path, monkeypatch, capsys):
    """The eval and export help examples, run as written on real directories (runs/q: the embedded Mixtral at 2
    bits; runs/vl2-q: the embedded DeepSeek-VL2 at 2 bits). The calibrate / allocate / quantize command lines run
    end to end in tests/test_readme_ways_in.py."""
    import torch

    import mcmoe_vl
    from mcmoe_vl.data.embedded import load_embedded_vlm
    from mcmoe_vl.quant.checkpoint import save_quantized
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
    from mcmoe_vl.quant.plan import BitPlan
    from model_adapters import get_adapter

    monkeypatch.chdir(tmp_path)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    plan = BitPlan.from_experts({i: [2] * 8 for i in range(4)}, model_type="mixtral")
    mcmoe_vl.compress(EMBEDDED, ids, plan=plan).save("runs/q")
    vlm, _ = load_embedded_vlm(dtype=torch.bfloat16)
    layers = {la.index: la.num_experts for la in get_adapter(vlm).moe_layers(vlm)}
    vplan = BitPlan.from_experts({i: [2] * n for i, n in layers.items()}, model_type="deepseek_vl_v2")
    report = quantize_model(vlm, vplan, [{"input_ids": ids[:1]}], QuantizeConfig(progress=False, min_tokens=1),
                            adapter=get_adapter(vlm))
    save_quantized(vlm, "runs/vl2-q", plan=vplan, report=report, adapter=get_adapter(vlm))
    ran = 0
    for name in ("eval", "export"):
        doc = importlib.import_module(f"mcmoe_vl.cli.{name}").__doc__
        for line in examples(doc):
            assert main(shlex.split(line)[1:]) == 0, line
            ran += 1
    assert ran == 5
    out = capsys.readouterr().out
    assert out.count("mcmoe_docstring_cloze") >= 2 and "mcmoe_vqa_colour" in out  # the harnesses' result tables
    assert (tmp_path / "runs/q-ct/config.json").is_file() and (tmp_path / "runs/q-gptq/model.safetensors").is_file()
    assert list((tmp_path / "runs/q-eval").rglob("*results*.json"))


@pytest.mark.slow
def test_the_workflow_examples_in_the_help_run_as_written(tmp_path, monkeypatch):
    """The calibrate -> allocate -> quantize -> prune examples of `--help`, run in order as written (optional parts
    included, first alternatives), with MODEL_DIR the embedded tiny Mixtral and calib.txt real training text."""
    from mcmoe_vl.data.text import stdlib_splits

    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(stdlib_splits().train_text()[:400_000])
    (tmp_path / "alloc.yaml").write_text("method: pmq\nscope: layer\n")
    ran = []
    for name in ("calibrate", "allocate", "quantize", "prune"):
        doc = importlib.import_module(f"mcmoe_vl.cli.{name}").__doc__
        for line in examples(re.sub(r"\\\n\s*", " ", doc or "")):
            argv = [str(EMBEDDED) if a == "MODEL_DIR" else a for a in _example_argv(line)]
            if name == "calibrate" or "--model" in argv:  # keep it short: fewer windows than the default
                argv += ["--num-sequences", "8"]
            if name != "allocate":
                argv.append("--no-progress")
            rc = main(argv)
            assert rc == 0, f"`{line}` exited {rc}"
            ran.append(line)
    assert len(ran) == 7
    assert (tmp_path / "runs" / "q" / "pruning.json").is_file() and (tmp_path / "plan.json").is_file()
