"""A small suite end to end on a tiny random Mixtral: stages, cache, resume, results files and the report."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import tomli_w
import torch

from mcmoe_vl.evaluation.results import load_results
from mcmoe_vl.report import stats
from mcmoe_vl.report.items import row_items
from mcmoe_vl.suite.load import load_suite
from mcmoe_vl.suite.runner import run_suite

DATA = Path(__file__).parent / "data" / "suite"


def tiny_checkpoint(d: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    from mcmoe_vl.data.tokenizer import VOCAB_SIZE, byte_tokenizer

    cfg = MixtralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(d)
    byte_tokenizer(model_max_length=256).save_pretrained(d)
    return d


def write_suite(root: Path, recipes: list[dict], name: str = "suite.toml", **over) -> Path:
    tasks = root / "tasks"
    if not tasks.exists():
        shutil.copytree(DATA / "tasks", tasks)
        for f in tasks.glob("*.yaml"):
            f.write_text(f.read_text().replace("DATA_DIR", str(tasks)))
    if not (root / "ckpt").exists():
        tiny_checkpoint(root / "ckpt")
        words = ["alpha", "beta", "gamma", "delta", "even", "odd", "number", "the", "is"]
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, len(words), (3000,), generator=g).tolist()
        (root / "calib.txt").write_text(" ".join(words[i] for i in idx))
    suite = {
        "name": "tiny e2e",
        "seeds": [0],
        "models": [{"name": "tiny-mixtral", "checkpoint": "ckpt", "adapter": "mixtral"}],
        "recipes": recipes,
        "tasks": [{"harness": "lm_eval", "name": "t8_parity", "limit": 6, "label": "Parity"},
                  {"harness": "lm_eval", "name": "t8_words", "limit": 3, "label": "Words"}],
        "calibration": {"data": "calib.txt", "num_sequences": 4, "seq_len": 64, "batch_size": 4, "eps_bits": [1, 2, 3],
                        "min_tokens": 1},
        "evaluation": {"lm_eval_include": ["tasks"], "batch_size": 4, "speed_tokens": 256, "speed_seq_len": 64},
        "run_dir": str(root / "runs"),
        "torch_threads": 1,
        "report": {"output_dir": str(root / "report")},
    }
    suite.update(over)
    p = root / name
    p.write_text(tomli_w.dumps(suite))
    return p


RECIPES = [
    {"name": "16-bit"},
    {"name": "ODP", "prune": {"method": "odp", "protect_ratio": 0.1}},
    {"name": "PMQ 2.0", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 16}},
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("suite")
    summary = run_suite(load_suite(write_suite(root, RECIPES)), progress=False, command="mcmoe-vl run suite.toml")
    return root, summary


def test_end_to_end_report_numbers_equal_results(first_run) -> None:
    root, summary = first_run
    assert summary.failed == []
    assert summary.report is not None and summary.report.is_file()
    names = {load_results(p).recipe for p in summary.results}
    assert {"16-bit", "ODP"} <= names
    md = summary.report.read_text()
    for p in summary.results:
        res = json.loads(p.read_text())
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {res['recipe']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        parity = res["results"]["t8_parity"][res["tasks"]["t8_parity"]["metric"]]
        words = res["results"]["t8_words"][res["tasks"]["t8_words"]["metric"]]
        assert cells[1] == "1"  # seeds
        assert cells[2].startswith(f"{100 * parity:.2f} ± ")
        # large perplexities are shown in scientific notation with 3 significant digits, with their interval
        assert float(cells[3].split(" [")[0]) == pytest.approx(words, rel=5e-3, abs=5e-3)
        assert cells[4].startswith(f"{statistics.fmean([100 * parity]):.2f} ± ")
        c = res["compression"]
        assert c["total_params"] > 0 and c["speed"]["tokens"] > 0
        assert len(c["active_experts"]) == 2
        # the per-item outputs beside the results file reproduce the harness's numbers
        items = row_items([load_results(p)], [p])
        assert items["t8_parity"].n == 6 and items["t8_words"].n == 3
        assert stats.score("acc", items["t8_parity"].values) == pytest.approx(parity, abs=1e-12)
        assert stats.score(res["tasks"]["t8_words"]["metric"], items["t8_words"].values) == pytest.approx(words,
                                                                                                         rel=1e-9)
        # memory measured, provenance recorded
        assert c["memory"]["resident_bytes"] > 0 and c["memory"]["peak_bytes"] > c["memory"]["resident_bytes"]
        prov = res["provenance"]
        assert prov["command"] == "mcmoe-vl run suite.toml" and prov["seeds"] == [0] and prov["cpu"]
        assert "lock" in prov
    # lm-eval's own schema is kept, plus the compression block
    base = load_results(next(p for p in summary.results if load_results(p).recipe == "16-bit"))
    assert base.compression.baseline and base.compression.nominal_bits == 16.0
    assert base.compression.active_experts[0].avg_active_experts == pytest.approx(2.0)
    odp = load_results(next(p for p in summary.results if load_results(p).recipe == "ODP"))
    assert odp.compression.prune.method == "odp"
    assert odp.compression.activated_params_reduction > 0  # the ratio rule really removed expert work
    assert odp.n_shot == {"t8_parity": 0, "t8_words": 0}
    assert odp.config["recipe"]["prune"]["protect_ratio"] == 0.1
    assert (root / "runs" / "suite.resolved.json").is_file()
    pmq = load_results(next(p for p in summary.results if load_results(p).recipe == "PMQ 2.0"))
    q = pmq.compression
    assert 1.0 < q.nominal_bits < 4.0 and q.size_bytes < base.compression.size_bytes
    assert q.quant.runtime == "fake" and q.quant.allocator == "pmq"
    assert q.speed.workload.endswith("packed runtime") and q.speed.reference_tokens_per_second > 0
    assert sorted(q.artifacts) == ["allocation_heatmap", "significance_heatmap"]
    assert q.memory.runtime == "packed" and q.memory.resident_bytes < base.compression.memory.resident_bytes
    md = summary.report.read_text()
    assert "tiny-mixtral: allocation heatmap, PMQ 2.0" in md
    assert "figures/tiny-mixtral-significance-heatmap.png" in md  # named after the model, not a recipe
    assert "| PMQ 2.0 | 16-bit |" in md and "| ODP | 16-bit |" in md  # the paired comparisons
    assert "## Provenance" in md and "mcmoe-vl run suite.toml" in md


def test_rerun_reuses_every_stage_and_gives_identical_report(first_run) -> None:
    root, summary = first_run
    again = run_suite(load_suite(root / "suite.toml"), progress=False, command="mcmoe-vl run suite.toml")
    assert again.computed == {}, again.computed
    assert again.reused.get("evaluate") == len(summary.results)
    assert again.report.read_bytes() == summary.report.read_bytes()


def test_half_written_artifact_is_not_trusted(first_run) -> None:
    root, summary = first_run
    odp = next(p for p in summary.results if load_results(p).recipe == "ODP")
    keys = load_results(odp).config["stage_keys"]
    prune_dir = root / "runs" / "prune" / keys["prune"]
    eval_dir = root / "runs" / "evaluate" / keys["evaluate"]
    # an interrupted evaluate stage: results.json cut short and no completion record
    (eval_dir / "stage.json").unlink()
    (eval_dir / "results.json").write_text('{"schema": "mcmoe_vl.res')
    # and a pruning artifact edited after it was recorded
    art = prune_dir / "pruning.json"
    art.write_text(art.read_text().replace('"protect_ratio": 0.1', '"protect_ratio": 0.5'))
    again = run_suite(load_suite(root / "suite.toml"), progress=False, recipes=["ODP"])
    assert again.computed == {"prune": 1, "evaluate": 1}
    assert json.loads(art.read_text())["odp"]["protect_ratio"] == 0.1
    assert load_results(eval_dir / "results.json").recipe == "ODP"


def test_fake_quant_and_packed_runtimes_give_the_same_scores(first_run) -> None:
    root, summary = first_run
    fake = load_results(next(p for p in summary.results if load_results(p).recipe == "PMQ 2.0"))
    suite = write_suite(root, RECIPES, name="packed.toml",
                        evaluation={"lm_eval_include": ["tasks"], "batch_size": 4, "speed_tokens": 256,
                                    "speed_seq_len": 64, "runtime": "packed"},
                        report={"output_dir": str(root / "report_packed")})
    packed_run = run_suite(load_suite(suite), progress=False, recipes=["PMQ 2.0"])
    assert "quantize" not in packed_run.computed and packed_run.computed == {"evaluate": 1}  # same checkpoint
    packed = load_results(packed_run.results[0])
    assert packed.compression.quant.runtime == "packed"
    assert packed.config["stage_keys"]["quantize"] == fake.config["stage_keys"]["quantize"]
    for task in fake.tasks:
        assert packed.score(task) == fake.score(task), task
    assert packed.results["t8_words"]["word_perplexity,none"] == fake.results["t8_words"]["word_perplexity,none"]


def test_incomplete_run_keeps_the_last_good_report(first_run, monkeypatch, capsys) -> None:
    from mcmoe_vl.cli import main
    from mcmoe_vl.suite.runner import SuiteRunner

    root, summary = first_run
    good = summary.report.read_bytes()
    real = SuiteRunner.evaluate

    def odp_breaks(self, ctx, recipe, keys):
        if recipe.name == "ODP":
            raise RuntimeError("the ODP recipe broke")
        return real(self, ctx, recipe, keys)

    monkeypatch.setattr(SuiteRunner, "evaluate", odp_breaks)
    try:
        rc = main(["run", str(root / "suite.toml"), "--no-progress"])
        assert rc == 1
        err = capsys.readouterr().err
        assert f"{summary.report} was kept" in err and "--overwrite-report" in err
        assert summary.report.read_bytes() == good  # the last good report is untouched
        partial = root / "runs" / "report" / "report.md"
        text = partial.read_text()
        assert "FAILED" in text and "the ODP recipe broke" in text
        # asked for explicitly: replaced, failures listed
        assert main(["run", str(root / "suite.toml"), "--no-progress", "--overwrite-report"]) == 1
        assert "the ODP recipe broke" in summary.report.read_text()
    finally:
        summary.report.write_bytes(good)
    # a complete run writes to the suite's report directory as before
    monkeypatch.setattr(SuiteRunner, "evaluate", real)
    again = run_suite(load_suite(root / "suite.toml"), progress=False)
    assert again.kept_report is None and again.report == summary.report
