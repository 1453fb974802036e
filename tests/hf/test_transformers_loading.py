"""A compressed checkpoint is a Hugging Face model directory: transformers loads it, strictly and bit-exactly."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import mcmoe_vl  # noqa: F401  (registers the format with transformers)
from mcmoe_vl.calibration.workflow import load_model
from mcmoe_vl.quant.checkpoint import (MANIFEST_FILE, TENSOR_FILE, CheckpointError, load_quantized, save_quantized,
                                       seal_manifest)
from mcmoe_vl.quant.model import QuantizeConfig, quantize_model
from mcmoe_vl.quant.plan import BitPlan
from model_adapters import get_adapter

EMBEDDED = Path(__file__).resolve().parents[2] / "embedded" / "mixtral-tiny"


def _ids(n: int = 2, seq: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seq), generator=g)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model = load_model(EMBEDDED, dtype=torch.bfloat16)
    plan = BitPlan.from_experts({i: [2, 3, 1, 2, 2, 3, 2, 1] for i in range(4)}, model_type="mixtral")
    batches = [{"input_ids": row[None]} for row in _ids(2, 64, seed=1)]
    report = quantize_model(model, plan, batches, QuantizeConfig(progress=False, min_tokens=1),
                            adapter=get_adapter(model))
    out = tmp_path_factory.mktemp("hf") / "q"
    save_quantized(model, out, plan=plan, report=report,
                   adapter=get_adapter(model))  # source directory: config._name_or_path
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_directory_is_a_hugging_face_model_directory(ckpt):
    names = set(os.listdir(ckpt))
    assert {"config.json", TENSOR_FILE, MANIFEST_FILE, "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["quantization_config"]["quant_method"] == "mcmoe_vl"
    assert (ckpt / "generation_config.json").read_bytes() == (EMBEDDED / "generation_config.json").read_bytes()
    mode = stat.S_IMODE(os.stat(ckpt / TENSOR_FILE).st_mode)
    assert mode & 0o044, f"model.safetensors is {oct(mode)}: not readable by group/others"


def test_from_pretrained_equals_load_quantized_bit_for_bit(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = load_quantized(ckpt)
    model, info = AutoModelForCausalLM.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "MixtralForCausalLM"
    n_packed = sum(type(m).__name__ == "QuantLinear" for m in model.modules())
    assert n_packed == sum(type(m).__name__ == "QuantLinear" for m in ref.modules()) > 0
    ids = _ids(2, 40, seed=5)
    a, b = _logits(ref, ids), _logits(model, ids)
    assert a.abs().sum() > 0 and torch.equal(a, b)
    # and the unmodified model differs (the comparison is not vacuous)
    orig = load_model(EMBEDDED, dtype=torch.bfloat16)
    assert not torch.equal(_logits(orig, ids), a)
    assert AutoTokenizer.from_pretrained(str(ckpt))("ab")["input_ids"]


def test_save_pretrained_round_trips(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    model.save_pretrained(tmp_path / "again")
    assert {"config.json", TENSOR_FILE, MANIFEST_FILE, "tokenizer.json"} <= set(os.listdir(tmp_path / "again"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"))
    ids = _ids(1, 32, seed=7)
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    a = json.loads((ckpt / MANIFEST_FILE).read_text())
    b = json.loads((tmp_path / "again" / MANIFEST_FILE).read_text())
    assert a["plan"] == b["plan"] and a["tensors"] == b["tensors"]


def test_a_missing_tensor_is_an_error_not_a_fresh_initialisation(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(str(bad / TENSOR_FILE))
    del tensors["model.layers.1.self_attn.o_proj.qdata"]
    save_file(tensors, str(bad / TENSOR_FILE), metadata={"format": "mcmoe_vl.quantized"})
    with pytest.raises(CheckpointError, match="truncated or was replaced"):
        AutoModelForCausalLM.from_pretrained(str(bad))
    # even with a manifest rewritten to match the file, the model's missing tensor is named
    man = json.loads((bad / MANIFEST_FILE).read_text())
    from mcmoe_vl.io import file_sha256

    del man["tensors"]["model.layers.1.self_attn.o_proj.qdata"]
    man["file"].update(bytes=os.stat(bad / TENSOR_FILE).st_size, sha256=file_sha256(bad / TENSOR_FILE))
    (bad / MANIFEST_FILE).write_text(json.dumps(seal_manifest(man)))
    with pytest.raises(CheckpointError, match="o_proj"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_an_edited_config_json_is_refused(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rms_norm_eps"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_pruning_settings_travel_in_the_directory(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from mcmoe_vl.hf import loading_options
    from mcmoe_vl.pruning.artifact import apply_pruning, odp_artifact, save_pruning
    from mcmoe_vl.pruning.odp import ODPThresholds
    from model_adapters import expert_interface

    d = tmp_path / "pruned"
    shutil.copytree(ckpt, d)
    ref = load_quantized(ckpt)
    art = odp_artifact(expert_interface(ref), ODPThresholds(mu={i: 0.6 for i in range(4)}, protect_ratio=0.0))
    save_pruning(art, d / "pruning.json")
    ids = _ids(1, 40, seed=3)
    dense = _logits(ref, ids)
    rule = apply_pruning(expert_interface(ref), art)
    pruned = _logits(ref, ids)
    rule.remove()
    assert not torch.equal(pruned, dense)  # the thresholds really drop experts on these tokens

    model = AutoModelForCausalLM.from_pretrained(str(d))
    assert model.mcmoe_pruning is not None
    assert torch.equal(_logits(model, ids), pruned)
    with loading_options(apply_pruning=False):
        off = AutoModelForCausalLM.from_pretrained(str(d))
    assert off.mcmoe_pruning is None and torch.equal(_logits(off, ids), dense)
    model.save_pretrained(tmp_path / "again")  # the settings are saved with it
    assert (tmp_path / "again" / "pruning.json").is_file()


@pytest.mark.parametrize("first", ["", "import mcmoe_vl.quant.checkpoint\n", "import transformers.modeling_utils\n"])
def test_import_mcmoe_vl_is_enough_in_a_fresh_process_and_stays_light(ckpt, first):
    """The registration waits for transformers' quantizer package (seconds to import) instead of importing it, and
    happens whichever is imported first: the package, or this project's modules that import transformers."""
    import subprocess
    import sys

    light = "assert 'transformers.quantizers' not in sys.modules and 'torch' not in sys.modules\n"
    code = (
        ("import sys\n" + first + "import mcmoe_vl\n" if first.startswith("import transformers")
         else "import sys, mcmoe_vl\n" + (light if not first else "") + first)
        + "from transformers import AutoModelForCausalLM\n"
        + f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
        + "print(sum(type(x).__name__ == 'QuantLinear' for x in m.modules()))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0
