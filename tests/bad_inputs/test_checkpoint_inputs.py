"""Bad inputs around compressed checkpoints: each is refused with a clear error before any work, or handled by a
declared fallback, and never leaves a file a later run would trust."""

import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mcmoe_vl.cli import main
from mcmoe_vl.quant.checkpoint import (MANIFEST_FILE, TENSOR_FILE, CheckpointError, load_quantized, read_manifest,
                                       save_quantized)
from mcmoe_vl.quant.plan import BitPlan
from model_adapters import get_adapter

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "embedded" / "mixtral-tiny"


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src") / "m"
    shutil.copytree(EMBEDDED, d)
    return d


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ids") / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))}, str(p))
    return p


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("plan") / "plan.json"
    BitPlan.from_experts({i: [2] * 8 for i in range(4)}, model_type="mixtral").save(p)
    return p


@pytest.fixture(scope="module")
def ckpt(model_dir, ids_file, plan_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "q"
    rc = main(["quantize", str(model_dir), "--plan", str(plan_file), "--data", str(ids_file), "-o", str(out),
               "--min-tokens", "1", "--no-progress"])
    assert rc == 0
    return out


# -- item 1: a checkpoint is never written into the source model's directory ---------------------------------------
@pytest.mark.parametrize("alias", [False, True])
def test_quantize_into_the_model_directory_is_refused_before_work(model_dir, ids_file, plan_file, tmp_path, capsys,
                                                                   alias):
    before = _digest(model_dir)
    out = model_dir
    if alias:  # the same directory under another name
        out = tmp_path / "link"
        out.symlink_to(model_dir, target_is_directory=True)
    rc = main(["quantize", str(model_dir), "--plan", str(plan_file), "--data", str(ids_file), "-o", str(out),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(out) in err and str(model_dir) in err  # both paths named
    assert _digest(model_dir) == before  # nothing written, nothing replaced


def test_save_quantized_refuses_the_directory_the_model_came_from(model_dir, tmp_path):
    from mcmoe_vl.calibration.workflow import load_model

    model = load_model(model_dir, dtype=torch.bfloat16)
    plan = BitPlan.from_experts({i: [2] * 8 for i in range(4)}, model_type="mixtral")
    before = _digest(model_dir)
    with pytest.raises(CheckpointError, match="source model's directory"):
        save_quantized(model, model_dir, plan=plan, adapter=get_adapter(model))  # config._name_or_path names the source
    with pytest.raises(CheckpointError, match=str(model_dir)):
        save_quantized(model, model_dir, plan=plan, source_dir=model_dir, adapter=get_adapter(model))
    assert _digest(model_dir) == before


# -- item 9: the manifest carries an integrity check -----------------------------------------------------------------
def _edit(ckpt: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    man = json.loads((bad / MANIFEST_FILE).read_text())
    edit(man)
    (bad / MANIFEST_FILE).write_text(json.dumps(man))
    return bad


EDITS = {
    "bits": lambda m: m["quantized"]["model.layers.0.self_attn.q_proj"].update(bits=3),
    "plan": lambda m: m["plan"]["layers"][0]["bits"].__setitem__(0, 3),
    "accounting": lambda m: m["accounting"].update(nominal_bits=1.0),
    "config": lambda m: m["config"].update(rms_norm_eps=0.1),
}


@pytest.mark.parametrize("what", sorted(EDITS))
def test_an_edited_manifest_is_refused(ckpt, tmp_path, what):
    load_quantized(ckpt)  # the unedited checkpoint loads
    bad = _edit(ckpt, tmp_path, EDITS[what])
    with pytest.raises(CheckpointError, match="edited after it was written"):
        load_quantized(bad)
    with pytest.raises(CheckpointError, match="edited after it was written"):
        read_manifest(bad)


def test_a_manifest_without_file_is_a_clear_error(ckpt, tmp_path):
    bad = _edit(ckpt, tmp_path, lambda m: m.pop("file"))
    with pytest.raises(CheckpointError, match="invalid manifest: file: required key is missing"):
        load_quantized(bad)
    bad2 = _edit(ckpt, tmp_path / "2", lambda m: m["file"].pop("sha256"))
    with pytest.raises(CheckpointError, match="file.sha256: required key is missing"):
        load_quantized(bad2)


def test_tensor_file_has_ordinary_permissions(ckpt):
    umask = os.umask(0)
    os.umask(umask)
    for name in (TENSOR_FILE, MANIFEST_FILE, "config.json"):
        assert stat.S_IMODE(os.stat(ckpt / name).st_mode) == 0o666 & ~umask, name


# -- item 10 (CLI): over-long sequences, non-UTF-8 text ----------------------------------------------------------------
def test_seq_len_above_the_model_maximum_is_clamped_with_a_warning(model_dir, tmp_path, caplog):
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40, encoding="utf-8")  # about 1100 byte tokens
    out = tmp_path / "stats.json"
    with caplog.at_level(logging.WARNING):
        rc = main(["calibrate", str(model_dir), "--data", str(text), "-o", str(out), "--num-sequences", "1",
                   "--seq-len", "100000", "--eps-bits", "--no-progress"])
    assert rc == 0
    assert any("100000 exceeds the model's maximum of 256" in r.getMessage() for r in caplog.records)
    stats = json.loads(out.read_text())
    assert stats["num_sequences"] == 1
    assert stats["layers"][0]["all"]["num_tokens"] == 256  # one sequence of the clamped length


def test_non_utf8_text_is_named_in_its_error(model_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1") * 50)
    out = tmp_path / "stats.json"
    rc = main(["calibrate", str(model_dir), "--data", str(bad), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "not UTF-8" in err
    assert not out.exists()


def test_token_ids_longer_than_the_model_maximum_are_refused_before_work(model_dir, tmp_path, capsys, monkeypatch):
    import mcmoe_vl.calibration.workflow as wf

    monkeypatch.setattr(wf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    ids = tmp_path / "long.safetensors"
    save_file({"input_ids": torch.zeros(1, 300, dtype=torch.int64)}, str(ids))
    out = tmp_path / "stats.json"
    rc = main(["calibrate", str(model_dir), "--data", str(ids), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(ids) in err and "300 tokens exceed the model's maximum of 256" in err
    assert not out.exists()
