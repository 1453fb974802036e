"""``mcmoe-vl calibrate`` and ``mcmoe-vl allocate`` end to end on a tiny saved Mixtral."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tiny_models import tiny_mixtral

from mcmoe_vl.calibration.data import load_token_ids, token_windows
from mcmoe_vl.calibration.stats import load_stats
from mcmoe_vl.cli import allocate as allocate_cli
from mcmoe_vl.cli import calibrate as calibrate_cli
from mcmoe_vl.quant.plan import BitPlan


def run_cli(module, argv):
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny_mixtral(seed=5, layers=2).save_pretrained(d / "model")
    g = torch.Generator().manual_seed(0)
    (d / "ids.json").write_text(json.dumps(torch.randint(0, 96, (6, 12), generator=g).tolist()))
    return d


def test_calibrate_then_allocate(saved, tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    rc = run_cli(calibrate_cli, ["calibrate", str(saved / "model"), "--data", str(saved / "ids.json"),
                                 "-o", str(stats_path), "--batch-size", "4", "--group-size", "16",
                                 "--no-progress", "--plot", str(tmp_path / "sig.png")])
    assert rc == 0 and (tmp_path / "sig.png").stat().st_size > 0
    stats = load_stats(stats_path)
    assert stats.complete and stats.num_tokens == 72 and stats.num_sequences == 6
    assert all(sum(la.all.counts) == 2 * 72 for la in stats.layers)
    assert sorted(stats.layers[0].eps) == ["1", "2", "3"]

    cfg = tmp_path / "alloc.yaml"
    cfg.write_text("method: pmq\ntarget_bits: 1.5\nscope: global\ngamma: 1.0\n")
    plan_path = tmp_path / "plan.json"
    rc = run_cli(allocate_cli, ["allocate", str(stats_path), "-o", str(plan_path), "--config", str(cfg),
                                "--target-bits", "2.0", "--heatmap", str(tmp_path / "bits.png")])
    assert rc == 0 and (tmp_path / "bits.png").stat().st_size > 0
    plan = BitPlan.load(plan_path)
    assert plan.settings["target_bits"] == 2.0  # the flag beats the file
    assert plan.settings["scope"] == "global" and plan.settings["gamma"] == 1.0  # the file beats the defaults
    assert plan.achieved["nominal"] == 2.0 and [lp.index for lp in plan.layers] == [0, 1]
    assert "achieved 2.0000 nominal" in capsys.readouterr().out


def test_cli_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration data not found"):
        run_cli(calibrate_cli, ["calibrate", str(saved / "model"), "--data", str(tmp_path / "none.txt"),
                                "-o", str(tmp_path / "s.json")])
    with pytest.raises(FileNotFoundError, match="calibration statistics not found"):
        run_cli(allocate_cli, ["allocate", str(tmp_path / "none.json"), "-o", str(tmp_path / "p.json")])
    bad = tmp_path / "ids.json"
    bad.write_text(json.dumps([[1, 2, 3], [4, 5]]))
    with pytest.raises(ValueError, match="different lengths"):
        load_token_ids(bad)


def test_token_windows_are_seeded():
    ids = torch.arange(1000)
    a, b = token_windows(ids, 16, 4, seed=3), token_windows(ids, 16, 4, seed=3)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(ids[:10], 16, 1)


def test_text_data_is_tokenized_with_the_model_tokenizer(tmp_path):
    from mcmoe_vl.calibration.workflow import CalibrationRun, calibrate_files
    from mcmoe_vl.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    model = tiny_mixtral(seed=6, layers=1)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("Return the sum of a and b. " * 20)
    stats = calibrate_files(CalibrationRun(model=str(tmp_path / "model"), data=str(text), output=str(tmp_path / "s.json"),
                                           num_sequences=3, seq_len=32, batch_size=3, progress=False))
    assert stats.num_tokens == 96 and stats.num_sequences == 3
    with pytest.raises(ValueError, match="unknown embedded split"):
        calibrate_files(CalibrationRun(model=str(tmp_path / "model"), data="embedded:nope",
                                       output=str(tmp_path / "t.json")))


def test_allocate_pmq_plus(saved, tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    assert run_cli(calibrate_cli, ["calibrate", str(saved / "model"), "--data", str(saved / "ids.json"),
                                   "-o", str(stats_path), "--batch-size", "3", "--group-size", "16",
                                   "--num-sequences", "4", "--eps-quantizer", "gptq", "--refit-1bit",
                                   "--no-progress"]) == 0
    assert load_stats(stats_path).config["quantizer"] == "gptq"
    sel = tmp_path / "select.json"
    g = torch.Generator().manual_seed(9)
    sel.write_text(json.dumps(torch.randint(0, 96, (3, 12), generator=g).tolist()))
    plan_path = tmp_path / "plan.json"
    argv = ["allocate", str(stats_path), "-o", str(plan_path), "--method", "pmq+", "--target-bits", "2.0",
            "--group-size", "16", "--model", str(saved / "model"), "--data", str(saved / "ids.json"),
            "--num-sequences", "4", "--batch-size", "3", "--select-data", str(sel), "--max-candidates", "3"]
    assert run_cli(allocate_cli, argv) == 0
    plan = BitPlan.load(plan_path)
    assert plan.allocator == "pmq+" and len(plan.selection["candidates"]) == 3
    assert f"pmq+: chose {plan.selection['chosen']}" in capsys.readouterr().out
    # the plan-building data must be the statistics' data
    with pytest.raises(ValueError, match="not the data the statistics"):
        run_cli(allocate_cli, [a if a != "4" else "5" for a in argv])
    with pytest.raises(ValueError, match="give --model and --data"):
        run_cli(allocate_cli, ["allocate", str(stats_path), "-o", str(plan_path), "--method", "pmq+"])


def test_allocate_pmq_plus_refuses_to_overwrite_an_input(saved, tmp_path):
    ids = saved / "ids.json"
    with pytest.raises(ValueError, match="is the calibration data"):
        run_cli(allocate_cli, ["allocate", str(tmp_path / "stats.json"), "-o", str(ids), "--method", "pmq+",
                               "--model", str(saved / "model"), "--data", str(ids)])
