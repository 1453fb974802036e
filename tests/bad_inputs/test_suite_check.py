"""`mcmoe-vl run --check` (preflight) refuses, before any work, every recipe whose allocation cannot be met for the
model's MoE layout, and a suite whose run or report directory is a model's checkpoint directory."""

from __future__ import annotations


import pytest
from test_suite_run import write_suite

from mcmoe_vl.suite.load import SuiteError, load_suite, preflight
from mcmoe_vl.suite.runner import run_suite

INFEASIBLE = [
    ({"method": "uniform", "target_bits": 2.0, "bits": [1, 3]}, r"uniform allocation needs a target equal to one "
                                                                r"width's nominal bits \(1, 3\), got 2"),
    ({"method": "pmq", "target_bits": 0.5}, r"layer 0 \(8 experts\): target 0.5 nominal bits is outside the reachable "
                                        r"range \[1.375, 2.875\]"),
    ({"method": "pmq", "target_bits": 2.0, "bits": [3]}, r"target 2 nominal bits is outside the reachable range "
                                                        r"\[3, 3\]"),
    ({"method": "block", "target_bits": 5.0}, r"block allocation reaches 2..4 nominal bits"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("check")


@pytest.mark.parametrize("quant, match", INFEASIBLE, ids=["uniform-2-of-1,3", "pmq-0.5", "pmq-2-of-3", "block-5"])
def test_check_refuses_infeasible_recipes_before_calibration(root, quant, match):
    suite = write_suite(root, [{"name": "16-bit"}, {"name": "bad", "quant": {**quant, "group_size": 16}}],
                        name="bad.toml")
    with pytest.raises(SuiteError, match=rf"model 'tiny-mixtral', recipe 'bad': .*{match}"):
        preflight(load_suite(suite))
    assert not (root / "runs").exists()  # nothing ran


def test_check_accepts_feasible_recipes(root):
    suite = write_suite(root, [{"name": "u2", "quant": {"method": "uniform", "target_bits": 2, "group_size": 16}},
                               {"name": "pmq", "quant": {"method": "pmq", "target_bits": 2.5, "group_size": 16}}],
                        name="good.toml")
    assert set(preflight(load_suite(suite))) == {"tiny-mixtral"}


@pytest.mark.parametrize("where", ["run_dir", "report"])
def test_suite_output_inside_a_checkpoint_is_refused(tmp_path, where):
    write_suite(tmp_path, [{"name": "16-bit"}])
    ckpt = tmp_path / "ckpt"
    over = {"run_dir": str(ckpt / "runs")} if where == "run_dir" else \
        {"report": {"output_dir": str(ckpt)}}
    suite = write_suite(tmp_path, [{"name": "16-bit"}], name="into.toml", **over)
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(ValueError, match=rf"directory .* is inside the checkpoint directory of model "
                                         rf"'tiny-mixtral' {ckpt}"):
        run_suite(load_suite(suite), progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == before
