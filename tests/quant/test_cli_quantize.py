import torch
from tiny import batches, tiny_mixtral_q

from mcmoe_vl.cli import main
from mcmoe_vl.quant.checkpoint import load_quantized, read_manifest
from mcmoe_vl.quant.plan import BitPlan


def test_quantize_cli_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    model = tiny_mixtral_q(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    ids = torch.cat([b["input_ids"] for b in batches(2)])
    from safetensors.torch import save_file

    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    BitPlan.from_experts({0: [2, 3, 1, 4], 1: [2] * 4}, model_type="mixtral").save(tmp_path / "plan.json")
    rc = main(["quantize", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"),
               "--data", str(tmp_path / "ids.safetensors"), "-o", str(tmp_path / "q"), "--min-tokens", "1",
               "--no-progress"])
    assert rc == 0
    assert "effective" in capsys.readouterr().out
    man = read_manifest(tmp_path / "q")
    assert man.plan.experts[0] == [2, 3, 1, 4] and man.plan.model_type == "mixtral"
    assert man.quantized["model.layers.0.mlp.experts.experts.2.down"].bits == 1
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(loaded(ids[:1]).logits).all()
    # a plan for another model type is refused before any work
    BitPlan.from_experts({0: [2] * 4, 1: [2] * 4}, model_type="qwen3_moe").save(tmp_path / "bad.json")
    rc = main(["quantize", str(tmp_path / "model"), "--plan", str(tmp_path / "bad.json"),
               "--data", str(tmp_path / "ids.safetensors"), "-o", str(tmp_path / "q2"), "--no-progress"])
    assert rc == 2 and "qwen3_moe" in capsys.readouterr().err
