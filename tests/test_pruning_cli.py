"""``mcmoe-vl prune`` on a saved tiny model: writes an artifact that evaluation can load and apply."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mcmoe_vl.cli import prune as prune_cli
from mcmoe_vl.pruning import ActivationMeter, apply_pruning, load_pruning
from model_adapters import expert_interface

from tiny_models import tiny_mixtral



def _parser():
    parser = argparse.ArgumentParser()
    prune_cli.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_mixtral().save_pretrained(d)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    (d / "calib.json").write_text(json.dumps(ids.tolist()))
    return d


@pytest.mark.parametrize("method", ["odp", "otp"])
def test_prune_cli_writes_an_applicable_artifact(model_dir, method, tmp_path, capsys):
    out = tmp_path / "pruning.json"
    args = _parser().parse_args(["prune", str(model_dir), "--data", str(model_dir / "calib.json"), "--method", method,
                                 "--output", str(out), "--prune-rate", "0.2", "--otp-steps", "80", "--no-progress"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    art = load_pruning(out)
    assert art.method.value == method and art.pruned_layers == [0, 1]
    model = tiny_mixtral()
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), expert_interface(model) as iface, apply_pruning(iface, art), ActivationMeter(iface) as m:
        model(ids)
    assert 0.05 < m.report().reduction < 0.4


def test_prune_cli_rejects_bad_input_before_work(model_dir, tmp_path):
    args = _parser().parse_args(["prune", str(model_dir), "--data", str(tmp_path / "missing.txt"), "--method", "odp",
                                 "--output", str(tmp_path / "p.json")])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        args.func(args)
    args = _parser().parse_args(["prune", str(model_dir), "--data", str(model_dir / "calib.json"), "--method", "odp",
                                 "--output", str(tmp_path / "p.txt")])
    with pytest.raises(ValueError, match=".json"):
        args.func(args)
