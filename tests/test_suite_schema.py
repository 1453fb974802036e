"""Suite files: parsing (TOML and YAML), schema errors that name the key, preflight checks before long work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomli_w
import yaml

from mcmoe_vl.suite.load import SuiteError, load_suite, parse_suite_text, preflight, task_names_in
from mcmoe_vl.suite.schema import Harness, Suite

DATA = Path(__file__).parent / "data" / "suite"


def _tasks_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "tasks"
    shutil.copytree(DATA / "tasks", dst)
    for f in dst.glob("*.yaml"):
        f.write_text(f.read_text().replace("DATA_DIR", str(dst)))
    return dst


def _checkpoint(tmp_path: Path, model_type: str = "mixtral") -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    return d


def _suite_dict(**over) -> dict:
    d = {
        "name": "tiny",
        "seeds": [0],
        "models": [{"name": "m", "checkpoint": "ckpt", "adapter": "mixtral"}],
        "recipes": [
            {"name": "16-bit"},
            {"name": "uniform 2", "quant": {"method": "uniform", "target_bits": 2}},
            {"name": "PMQ 2.0 + ODP", "quant": {"method": "pmq", "target_bits": 2.0},
             "prune": {"method": "odp", "protect_ratio": 0.02}},
        ],
        "tasks": [{"harness": "lm_eval", "name": "t8_parity", "limit": 4},
                  {"harness": "lm_eval", "name": "t8_words", "limit": 2}],
        "calibration": {"data": "calib.txt", "num_sequences": 2, "seq_len": 16},
        "evaluation": {"lm_eval_include": ["tasks"]},
    }
    d.update(over)
    return d


def _write(tmp_path: Path, d: dict, fmt: str = "toml") -> Path:
    p = tmp_path / f"suite.{fmt}"
    p.write_text(tomli_w.dumps(d) if fmt == "toml" else yaml.safe_dump(d))
    return p


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    _tasks_dir(tmp_path)
    _checkpoint(tmp_path)
    (tmp_path / "calib.txt").write_text("some calibration text " * 20)
    return tmp_path


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_toml_and_yaml_give_the_same_suite(workdir: Path, fmt: str) -> None:
    loaded = load_suite(_write(workdir, _suite_dict(), fmt))
    s = loaded.suite
    assert [r.name for r in s.recipes] == ["16-bit", "uniform 2", "PMQ 2.0 + ODP"]
    assert s.recipes[0].is_baseline and not s.recipes[2].is_baseline
    assert s.recipes[1].quant.allocation.bits == (2,) and s.recipes[1].quant.allocation.require_widths == ()
    assert s.recipes[2].quant.allocation.bits == (1, 2, 3) and s.recipes[2].quant.allocation.require_widths is None
    assert s.models[0].resolved_harnesses == [Harness.LM_EVAL]
    locs = preflight(loaded)
    assert locs["m"] == (str(workdir / "ckpt"), True)
    # the resolved configuration round-trips through the schema
    assert Suite.model_validate(loaded.resolved_config()) == s


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["recipes"][2]["quant"].update(alocator="pmq"), "recipes.2.quant: Value error, unknown quant keys ['alocator']"),
        (lambda d: d["recipes"][2]["prune"].update(steps=3),
         "recipes.2.prune.odp.steps: unknown key; valid: method, mu, prune_rate, quantile"),
        (lambda d: d["calibration"].update(eps_bit=[2]), "calibration.eps_bit: unknown key; valid: data, num_sequences"),
        (lambda d: d.update(modles=[]), "modles: unknown key; valid: format_version, name"),
        (lambda d: d.update(format_version=1), "format 1 named the quant keys allocator / bits / bit_set"),
        (lambda d: d["tasks"][0].update(harness="lmms"), "tasks.0.harness"),
        (lambda d: d.pop("recipes"), "recipes: required key is missing"),
        (lambda d: d["recipes"].append({"name": "16-bit"}), "recipe names repeat"),
        (lambda d: d["recipes"][1]["quant"].update(target_bits=2.5), "whole number of target_bits"),
        (lambda d: d["recipes"][2]["prune"].update(method="xdp"), "recipes.2.prune: Value error, prune.method 'xdp' is not a pruning method; valid: odp, otp"),
        (lambda d: d["tasks"][0].update(models=["nope"]), "unknown models ['nope']"),
        (lambda d: d["recipes"][0].update(seeds=[1, 1]), "recipe seeds must be a non-empty list without repeats"),
        (lambda d: d.setdefault("report", {}).update(compare_to="PMQ 9"), "report.compare_to 'PMQ 9'"),
        (lambda d: d.setdefault("report", {}).update(confidence=1.5), "report.confidence"),
    ],
)
def test_schema_errors_name_the_key(workdir: Path, mutate, needle: str) -> None:
    d = _suite_dict()
    mutate(d)
    with pytest.raises(SuiteError, match=None) as ei:
        load_suite(_write(workdir, d))
    assert needle in str(ei.value), str(ei.value)
    assert "suite.toml" in str(ei.value)


def test_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text('name = "x"\n[[models]\n')
    with pytest.raises(SuiteError, match="cannot be parsed as TOML"):
        load_suite(p)
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "missing.toml")
    with pytest.raises(SuiteError, match="top level"):
        parse_suite_text("- a\n- b\n", fmt="yaml")


def test_unknown_task_is_refused_with_a_suggestion(workdir: Path) -> None:
    d = _suite_dict()
    d["tasks"][0]["name"] = "t8_parityy"
    with pytest.raises(SuiteError, match=r"unknown lm_eval task.*'t8_parityy'.*did you mean 't8_parity'"):
        preflight(load_suite(_write(workdir, d)))


def test_missing_checkpoint_and_wrong_adapter(workdir: Path) -> None:
    d = _suite_dict(models=[{"name": "m", "checkpoint": "./no/such/dir", "adapter": "mixtral"}])
    with pytest.raises(SuiteError, match="neither a directory"):
        preflight(load_suite(_write(workdir, d)))
    d = _suite_dict(models=[{"name": "m", "checkpoint": "ckpt", "adapter": "deepseek_v2"}])
    with pytest.raises(SuiteError, match="has model_type 'mixtral'"):
        preflight(load_suite(_write(workdir, d)))
    d = _suite_dict(models=[{"name": "m", "checkpoint": "ckpt", "adapter": "mixtrall"}])
    with pytest.raises(SuiteError, match="unknown model adapter.*'mixtrall'.*Did you mean 'mixtral'"):
        preflight(load_suite(_write(workdir, d)))


def test_hub_id_offline_not_cached(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(workdir / "hf_home"))
    d = _suite_dict(models=[{"name": "m", "checkpoint": "someorg/some-moe", "adapter": "mixtral"}])
    with pytest.raises(SuiteError, match="HF_HUB_OFFLINE"):
        preflight(load_suite(_write(workdir, d)))


def test_unknown_allocator_and_missing_calibration_data(workdir: Path) -> None:
    d = _suite_dict()
    d["recipes"][2]["quant"]["method"] = "pqm"
    with pytest.raises(SuiteError, match="unknown allocator 'pqm'.*Did you mean 'pmq'"):
        preflight(load_suite(_write(workdir, d)))
    d = _suite_dict()
    d["calibration"]["data"] = "nothere.txt"
    with pytest.raises(SuiteError, match="calibration data .nothere.txt.: file not found"):
        preflight(load_suite(_write(workdir, d)))


def test_task_names_are_read_from_yaml(workdir: Path) -> None:
    names = task_names_in([workdir / "tasks"])
    assert set(names) == {"t8_parity", "t8_words"}


def test_shipped_suites_parse() -> None:
    root = Path(__file__).parents[1] / "suites"
    files = sorted(root.glob("*.toml")) + sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"default.toml", "paper_mixtral.toml", "paper_deepseek_vl2.toml"}
    for f in files:
        s = load_suite(f).suite
        assert s.baseline_recipe is not None, f


def test_recipe_seeds_override_the_suite_seeds(workdir: Path) -> None:
    d = _suite_dict()
    d["seeds"] = [0, 1, 2]
    d["recipes"][0]["seeds"] = [0]
    d["recipes"][1]["seeds"] = [0, 7]
    s = load_suite(_write(workdir, d)).suite
    assert s.seeds_for(s.recipes[0]) == [0] and s.seeds_for(s.recipes[1]) == [0, 7]
    assert s.seeds_for(s.recipes[2]) == [0, 1, 2]
    assert s.all_seeds == [0, 1, 2, 7]
    assert s.report.confidence == 0.95 and s.report.compare_to is None


def test_recipe_slugs_keep_pmq_plus_apart_from_pmq() -> None:
    from mcmoe_vl.suite.schema import slug

    assert slug("PMQ 2.0 + ODP") == "pmq-2.0-odp"
    assert slug("pmq+ 2.0") == "pmqplus-2.0" != slug("PMQ 2.0")
    assert slug("pmq+ 2.0 + OTP") == "pmqplus-2.0-otp"
