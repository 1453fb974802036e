"""A vision-language suite end to end: a tiny random DeepSeek-VL2, image+text calibration, lmms-eval tasks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by scripts/setup.sh")

from mcmoe_vl.evaluation.results import load_results  # noqa: E402
from mcmoe_vl.report.items import row_items  # noqa: E402
from mcmoe_vl.suite.load import load_suite  # noqa: E402
from mcmoe_vl.suite.runner import run_suite  # noqa: E402

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _image(color: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    px = np.clip(np.array(COLORS[color], np.int16) + rng.integers(-20, 20, (42, 42, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(px)


def _checkpoint(d: Path) -> Path:
    from model_adapters.deepseek_vl2 import model_from_config, save_official
    from model_adapters.deepseek_vl2.tiny import tiny_official_config, tiny_tokenizer

    model = model_from_config(tiny_official_config(), seed=0)
    with torch.no_grad():
        for p in model.language.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # sharper routing and predictions than the default init
    save_official(model, d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _tasks(root: Path) -> Path:
    docs = [{"question": "What color is the image?", "color": c, "choices": list(COLORS), "answer": i}
            for i, c in enumerate(COLORS)]
    t = root / "lmms_tasks"
    t.mkdir()
    (t / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (t / "s8_utils.py").write_text(textwrap.dedent(f"""
        import numpy as np
        from PIL import Image
        COLORS = {COLORS!r}
        def doc_to_visual(doc):
            rng = np.random.default_rng(len(doc["color"]))
            base = np.array(COLORS[doc["color"]], dtype=np.int16)
            return [Image.fromarray(np.clip(base + rng.integers(-20, 20, (42, 42, 3)), 0, 255).astype(np.uint8))]
        def doc_to_choice(doc):
            return doc["choices"]
        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]
    """))
    (t / "s8_colour.yaml").write_text(textwrap.dedent(f"""
        task: s8_colour
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {t / "docs.jsonl"}
          cache_dir: {root / "hf_cache"}
        test_split: test
        doc_to_visual: !function s8_utils.doc_to_visual
        doc_to_text: !function s8_utils.doc_to_text
        output_type: multiple_choice
        doc_to_choice: !function s8_utils.doc_to_choice
        doc_to_target: answer
        metric_list:
          - metric: acc
    """))
    return t


def _calibration(root: Path) -> Path:
    lines = []
    for i in range(6):
        c = list(COLORS)[i % 3]
        _image(c, i).save(root / f"img{i}.png")
        lines.append(json.dumps({"text": "What color is the image?", "image": f"img{i}.png", "answer": c}))
    (root / "calib.jsonl").write_text("\n".join(lines))
    return root / "calib.jsonl"


def test_vlm_suite_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _checkpoint(tmp_path / "vl2")
    _tasks(tmp_path)
    _calibration(tmp_path)
    suite = {
        "name": "tiny vlm",
        "torch_threads": 1,
        "models": [{"name": "tiny-vl2", "checkpoint": "vl2", "adapter": "deepseek_vl_v2",
                    "calibration_data": "calib.jsonl"}],
        "recipes": [{"name": "16-bit"}, {"name": "ODP", "prune": {"method": "odp", "protect_ratio": 0.0}},
                    {"name": "PMQ 2.0", "quant": {"method": "pmq", "target_bits": 2.0, "group_size": 32}}],
        "tasks": [{"harness": "lmms_eval", "name": "s8_colour", "label": "Colour"}],
        "calibration": {"num_sequences": 6, "batch_size": 3, "eps_bits": [1, 2, 3], "min_tokens": 1},
        "evaluation": {"lmms_eval_include": ["lmms_tasks"], "batch_size": 3, "speed_tokens": 32, "speed_seq_len": 8},
        "run_dir": str(tmp_path / "runs"),
        "report": {"output_dir": str(tmp_path / "report")},
    }
    (tmp_path / "suite.toml").write_text(tomli_w.dumps(suite))
    summary = run_suite(load_suite(tmp_path / "suite.toml"), progress=False)
    assert summary.failed == [], summary.notes
    res = {load_results(p).recipe: load_results(p) for p in summary.results}
    assert set(res) == {"16-bit", "ODP", "PMQ 2.0"}, summary.notes
    for r in res.values():
        assert r.tasks["s8_colour"].harness == "lmms_eval"
        assert 0.0 <= r.score("s8_colour") <= 1.0
        assert r.compression.speed is not None and r.compression.speed.tokens > 0
    calib_key = res["PMQ 2.0"].config["stage_keys"]["calibrate"]
    stats = json.loads((tmp_path / "runs" / "calibrate" / calib_key / "stats.json").read_text())
    assert stats["layers"][0]["image"]["num_tokens"] > 0  # image tokens were seen and split out
    assert res["ODP"].compression.activated_params_reduction > 0
    assert res["PMQ 2.0"].compression.nominal_bits < 16
    md = summary.report.read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| PMQ 2.0 |"))
    assert row.split("|")[3].strip().startswith(f"{100 * res['PMQ 2.0'].score('s8_colour'):.2f} ± ")
    # lmms-eval's per-item outputs are kept and reproduce its score
    for name, r in res.items():
        path = next(p for p in summary.results if load_results(p).recipe == name)
        items = row_items([r], [path])["s8_colour"]
        assert items.n == r.n_samples["s8_colour"]["effective"] > 0
        assert float(items.values.mean()) == pytest.approx(r.score("s8_colour"), abs=1e-12)
