"""The adapter owns its family's modality: the pipeline asks the adapter and never names a family."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mcmoe_vl.suite.schema import Harness, ModelSpec
from model_adapters import get_adapter
from model_adapters.base import Modality, MoEAdapter

ROOT = Path(__file__).resolve().parents[1]
# the pipeline packages issue 18 names: none of them may test for a family or read a family's own inputs
PIPELINE = ["suite", "calibration", "allocation", "quant", "pruning", "evaluation", "report"]
FAMILY_CHECK = re.compile(r"""==\s*["']deepseek_vl_v2["']|images_seq_mask|\bVLM_TYPES\b|from model_adapters\.deepseek""")


def test_no_pipeline_module_names_a_family():
    offenders = []
    for pkg in PIPELINE:
        for f in sorted((ROOT / "mcmoe_vl" / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if FAMILY_CHECK.search(line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


# the harness plug-in and the exports serve every family through its adapter: no family's name appears in them
FAMILY_AGNOSTIC = ["mcmoe_vl/evaluation/harness_lmms_eval.py", *sorted(
    f.relative_to(ROOT).as_posix() for f in (ROOT / "mcmoe_vl" / "export").glob("*.py"))]
FAMILY_NAME = re.compile(r"deepseek|qwen|mixtral", re.IGNORECASE)


def test_harness_plugin_and_exports_name_no_family():
    assert len(FAMILY_AGNOSTIC) >= 5  # the plug-in and the export modules were found
    offenders = [f"{rel}:{n}: {line.strip()}" for rel in FAMILY_AGNOSTIC
                 for n, line in enumerate((ROOT / rel).read_text(encoding="utf-8").splitlines(), 1)
                 if FAMILY_NAME.search(line)]
    assert offenders == [], "\n".join(offenders)


def test_modality_comes_from_the_adapter():
    assert get_adapter("mixtral").modality is Modality.TEXT and not get_adapter("mixtral").is_vision_language
    vl2 = get_adapter("deepseek_vl_v2")
    assert vl2.modality is Modality.VISION_LANGUAGE and not vl2.hub_loadable
    assert ModelSpec(name="m", checkpoint="x", adapter="mixtral").resolved_harnesses == [Harness.LM_EVAL]
    assert ModelSpec(name="v", checkpoint="x", adapter="deepseek_vl_v2").resolved_harnesses == [Harness.LMMS_EVAL]


def test_text_families_refuse_the_vision_language_hooks():
    text = MoEAdapter()
    with pytest.raises(NotImplementedError, match="image\\+text samples are for vision-language models"):
        text.calibration_batches(None, [], 1)
    with pytest.raises(NotImplementedError, match="no lmms-eval model"):
        text.lmms_model(torch.nn.Linear(1, 1), None)
    assert text.load_processor("tok", None) == "tok"


def test_image_token_mask_is_the_adapters_reading_of_a_batch():
    m = torch.tensor([[False, True]])
    assert MoEAdapter().image_token_mask({"image_token_mask": m}) is m
    assert MoEAdapter().image_token_mask({"images_seq_mask": m}) is None  # a family's own input: its adapter's
    vl2 = get_adapter("deepseek_vl_v2")
    assert vl2.image_token_mask({"images_seq_mask": m}) is m
    other = torch.tensor([[True, False]])
    assert vl2.image_token_mask({"images_seq_mask": m, "image_token_mask": other}) is other


def test_a_second_vision_language_family_needs_only_its_adapter():
    """Qwen3-VL-MoE is one adapter module: the suite schema routes it to lmms-eval through its modality alone."""
    adapter = get_adapter("qwen3_vl_moe")
    assert adapter.is_vision_language and adapter.hub_loadable
    assert ModelSpec(name="q", checkpoint="x", adapter="qwen3_vl_moe").resolved_harnesses == [Harness.LMMS_EVAL]
    m = torch.tensor([[False, True]])
    assert adapter.image_token_mask({"image_token_mask": m}) is m
