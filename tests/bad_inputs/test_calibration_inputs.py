"""Bad inputs to calibration: statistics of other weights, edited or out-of-range values, non-finite weights,
malformed token ids, wrong model paths. Each is a clear error before work that names the input and what is valid,
and leaves no file a later run would trust."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from battery_helpers import save_tiny_mixtral
from safetensors.torch import save_file
from tiny_models import tiny_mixtral

from mcmoe_vl.calibration.calibrate import CalibrationConfig, ResumeError, calibrate
from mcmoe_vl.calibration.stats import load_stats
from mcmoe_vl.calibration.workflow import CalibrationRun, calibrate_files
from mcmoe_vl.moe.checks import NonFiniteWeightError
from model_adapters import get_adapter

CFG = CalibrationConfig(eps_bits=(1, 2), min_tokens=1)


def _run(model: Path, out: Path, data: Path | str, **kw) -> CalibrationRun:
    return CalibrationRun(model=str(model), data=str(data), output=str(out), calibration=CFG, num_sequences=2,
                          seq_len=16, progress=False, **kw)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("cal")
    text = d / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 40)
    stats = d / "stats.json"
    calibrate_files(_run(tiny_ckpt, stats, text))
    return tiny_ckpt, text, stats


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)}]


# -- item 2: statistics of other weights --------------------------------------------------------------------------
def test_resume_refuses_statistics_of_other_weights_files(calibrated, tmp_path):
    ckpt, text, stats = calibrated
    other = save_tiny_mixtral(tmp_path / "other", seed=1)  # same shapes and config, other weights
    copy = tmp_path / "stats.json"
    copy.write_bytes(stats.read_bytes())
    with pytest.raises(ResumeError, match="different weights"):
        calibrate_files(_run(other, copy, text))
    assert copy.read_bytes() == stats.read_bytes()


def test_resume_refuses_statistics_of_other_weights_in_memory(tmp_path):
    out = tmp_path / "stats.json"
    calibrate(tiny_mixtral(seed=0), _batches(), CFG, output=out, progress=False)
    before = out.read_bytes()
    perturbed = tiny_mixtral(seed=0)
    with torch.no_grad():
        perturbed.model.layers[1].mlp.experts.down_proj[3] += 1e-3
    with pytest.raises(ResumeError, match="different weights"):
        calibrate(perturbed, _batches(), CFG, output=out, progress=False)
    assert out.read_bytes() == before
    # the same weights resume (nothing left to do) without touching the file
    calibrate(tiny_mixtral(seed=0), _batches(), CFG, output=out, progress=False)
    assert out.read_bytes() == before


# -- item 3 (library level): an edited file is not resumed --------------------------------------------------------
def test_resume_refuses_an_edited_statistics_file(calibrated, tmp_path):
    ckpt, text, stats = calibrated
    edited = tmp_path / "stats.json"
    data = json.loads(stats.read_text())
    data["layers"][0]["eps"]["1"][0] *= 2
    edited.write_text(json.dumps(data))
    with pytest.raises(ResumeError, match="checksum"):
        calibrate_files(_run(ckpt, edited, text))


def test_allocate_refuses_an_edited_statistics_file(calibrated, tmp_path):
    """A valid-looking but hand-edited statistics file is refused by allocation (its checksum), before any plan."""
    from mcmoe_vl.allocation.config import AllocationConfig
    from mcmoe_vl.allocation.workflow import allocate_files

    _, _, stats = calibrated
    edited = tmp_path / "stats.json"
    data = json.loads(stats.read_text())
    data["layers"][1]["eps"]["2"][3] *= 0.5  # still finite and non-negative
    edited.write_text(json.dumps(data))
    plan = tmp_path / "plan.json"
    with pytest.raises(ValueError, match=r"does not match its checksum.*re-run mcmoe-vl calibrate"):
        allocate_files(edited, plan, AllocationConfig(target_bits=1.5, bits=(1, 2)))
    assert not plan.exists()
    allocate_files(stats, plan, AllocationConfig(target_bits=1.5, bits=(1, 2)))  # the untouched file is accepted
    assert plan.exists()


# -- item 5: negative (or non-finite) eps --------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_out_of_range_eps_is_refused_naming_layer_and_expert(calibrated, tmp_path, value):
    from mcmoe_vl.allocation.config import AllocationConfig
    from mcmoe_vl.allocation.workflow import allocate_files  # what `mcmoe-vl allocate` runs

    _, _, stats = calibrated
    bad = tmp_path / "stats.json"
    data = json.loads(stats.read_text())
    data["layers"][1]["eps"]["2"][3] = value
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layer 1 .*eps\[2-bit\] of expert 3 .*valid: a finite number >= 0"):
        load_stats(bad)
    plan = tmp_path / "plan.json"
    with pytest.raises(ValueError, match="expert 3"):
        allocate_files(bad, plan, AllocationConfig(target_bits=2.0))
    assert not plan.exists()


# -- item 7: non-finite expert weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_expert_weight_is_refused_before_work(tmp_path, value):
    model = tiny_mixtral(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[2, 5, 7] = value
    out = tmp_path / "stats.json"
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.1\.mlp: expert 2 \((gate|up) projection\)"):
        calibrate(model, _batches(), CFG, output=out, progress=False)
    assert not out.exists()


def test_non_finite_attention_weight_is_named(tmp_path):
    model = tiny_mixtral(seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        calibrate(model, _batches(), CFG, progress=False)


# -- item 10: token ids, paths, model types -------------------------------------------------------------------------
@pytest.mark.parametrize("ids, match", [
    ([[1, 2, -3, 4]], r"token id -3 at \(sequence, position\) \(0, 2\).*valid: ids >= 0"),
    ([[1, 2.5, 3, 4]], r"position 1 is 2.5; valid: integers"),
    ([[1, True, 3, 4]], r"position 1 is True; valid: integers"),
])
def test_bad_token_ids_json(calibrated, tmp_path, ids, match):
    ckpt, _, _ = calibrated
    f = tmp_path / "ids.json"
    f.write_text(json.dumps(ids))
    with pytest.raises(ValueError, match=match):
        calibrate_files(_run(ckpt, tmp_path / "stats.json", f))
    assert not (tmp_path / "stats.json").exists()


def test_float_token_ids_safetensors(calibrated, tmp_path):
    ckpt, _, _ = calibrated
    f = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.tensor([[1.0, 2.0, 3.0]])}, str(f))
    with pytest.raises(ValueError, match="dtype torch.float32; valid: an integer dtype"):
        calibrate_files(_run(ckpt, tmp_path / "stats.json", f))


def test_token_id_beyond_the_vocabulary(calibrated, tmp_path):
    ckpt, _, _ = calibrated
    f = tmp_path / "ids.json"
    f.write_text(json.dumps([[1, 2, 300]]))
    with pytest.raises(ValueError, match=r"token id 300 .*valid: 0 <= id < 260"):
        calibrate_files(_run(ckpt, tmp_path / "stats.json", f))


def test_nonexistent_model_path_is_named_without_the_hub(calibrated, tmp_path):
    _, text, _ = calibrated
    with pytest.raises(FileNotFoundError, match="model directory .*nowhere does not exist") as exc:
        calibrate_files(_run(tmp_path / "nowhere", tmp_path / "stats.json", text))
    assert "hub" not in str(exc.value).lower() and "tokenizer" not in str(exc.value).lower()


def test_unknown_model_type_lists_the_adapters(calibrated, tmp_path):
    ckpt, text, _ = calibrated
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mixtrall"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'mixtrall' has no adapter.*mixtral") as exc:
        calibrate_files(_run(odd, tmp_path / "stats.json", text))
    assert "upgrade" not in str(exc.value).lower()


def test_min_tokens_zero_message(caplog):
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
    from mcmoe_vl.quant.plan import BitPlan

    model = tiny_mixtral(seed=0, experts=8)
    plan = BitPlan.uniform({0: 8, 1: 8}, 2, group_size=16)
    one_token = [{"input_ids": torch.tensor([[5]])}]  # top-2 of 8: most experts see no token
    with caplog.at_level(logging.WARNING):
        report = quantize_model(model, plan, one_token, QuantizeConfig(progress=False, min_tokens=0),
                                adapter=get_adapter(model))
    assert report.starved  # the fallback did happen
    assert "had no calibration token" in caplog.text and "fewer than 0" not in caplog.text


# -- item 1 (workflow level): outputs inside an input directory ------------------------------------------------------
def test_calibration_output_inside_the_model_directory_is_refused(calibrated):
    ckpt, text, _ = calibrated
    with pytest.raises(ValueError, match=rf"output {ckpt}/stats.json is inside the model directory {ckpt}"):
        calibrate_files(_run(ckpt, ckpt / "stats.json", text))
    assert not (ckpt / "stats.json").exists()


def test_non_finite_expert_weight_is_refused_by_quantization():
    from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
    from mcmoe_vl.quant.plan import BitPlan

    model = tiny_mixtral(seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[5, 1, 1] = float("-inf")
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.0\.mlp: expert 5 \(down projection\)"):
        quantize_model(model, BitPlan.uniform({0: 8, 1: 8}, 2, group_size=16), _batches(),
                       QuantizeConfig(progress=False), adapter=get_adapter(model))


def test_checkpoint_missing_weights_is_refused_not_randomly_initialised(tiny_ckpt, tmp_path):
    """Item 1's aftermath: a directory whose weights file no longer matches its architecture (as after a quantized
    checkpoint overwrote it) is refused at load, instead of calibrating on random weights."""
    import shutil

    from safetensors.torch import load_file

    from mcmoe_vl.calibration.workflow import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.1.self_attn.q_proj.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold every weight .*missing keys: "
                                         r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        load_model(broken)
    assert load_model(tiny_ckpt) is not None  # the intact directory loads


@pytest.mark.parametrize("sub", ["", "compressed"])
def test_quantize_into_the_model_directory_is_refused_before_work(calibrated, tmp_path, sub):
    """Item 1 (workflow level): `quantize m -o m` (or a folder inside m) names both paths and writes nothing."""
    from mcmoe_vl.quant.plan import BitPlan
    from mcmoe_vl.quant.workflow import QuantizeRun, quantize_files

    ckpt, text, _ = calibrated
    plan = tmp_path / "plan.json"
    BitPlan.from_experts({0: [2] * 4, 1: [2] * 4}, model_type="mixtral", group_size=16).save(plan)
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    out = ckpt / sub if sub else ckpt
    with pytest.raises(ValueError, match=rf"output directory {out} is inside the model directory {ckpt}"):
        quantize_files(QuantizeRun(model=str(ckpt), plan=str(plan), data=str(text), output=str(out),
                                   num_sequences=2, seq_len=16))
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before


def test_non_finite_weight_in_a_checkpoint_is_refused_at_load(tiny_ckpt, tmp_path):
    """Item 7 at load: every recipe of a suite (the 16-bit one too) and every CLI workflow loads through here."""
    import shutil

    from safetensors.torch import load_file

    from mcmoe_vl.calibration.workflow import load_model

    bad = tmp_path / "nan"
    shutil.copytree(tiny_ckpt, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.block_sparse_moe.experts.2.w2.weight"][0, 0] = float("nan")  # expert 2's down projection
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.0\.mlp: expert 2 \(down projection\) has 1 NaN"):
        load_model(bad)


def test_plan_from_other_weights_is_refused_by_quantize(calibrated, tmp_path):
    """Item 2 one stage later: an allocator plan records the weights its statistics came from."""
    from mcmoe_vl.allocation.config import AllocationConfig
    from mcmoe_vl.allocation.workflow import allocate_files
    from mcmoe_vl.quant.plan import load_plan
    from mcmoe_vl.quant.workflow import QuantizeRun, check_plan_source, quantize_files

    ckpt, text, stats = calibrated
    plan = tmp_path / "plan.json"
    allocate_files(stats, plan, AllocationConfig(method="uniform", target_bits=2.0, bits=(2,), group_size=16))
    check_plan_source(load_plan(plan), str(ckpt))  # its own model: accepted
    other = save_tiny_mixtral(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=r"allocated from statistics measured on other weights .*model.safetensors"):
        quantize_files(QuantizeRun(model=str(other), plan=str(plan), data=str(text), output=str(tmp_path / "q"),
                                   num_sequences=2, seq_len=16))
    assert not (tmp_path / "q").exists()


def test_output_naming_an_input_file_is_refused(calibrated, tmp_path):
    """`--output` equal to the data file (calibrate) or to the statistics file (allocate) would overwrite it."""
    from mcmoe_vl.allocation.config import AllocationConfig
    from mcmoe_vl.allocation.workflow import allocate_files

    ckpt, text, stats = calibrated
    data = tmp_path / "calib.txt"
    data.write_bytes(text.read_bytes())
    with pytest.raises(ValueError, match=rf"output {data} is the calibration data"):
        calibrate_files(_run(ckpt, data, data))
    assert data.read_bytes() == text.read_bytes()
    copy = tmp_path / "stats.json"
    copy.write_bytes(stats.read_bytes())
    with pytest.raises(ValueError, match=rf"output {copy} is the statistics file"):
        allocate_files(copy, copy, AllocationConfig(target_bits=2.0))
    assert copy.read_bytes() == stats.read_bytes()
