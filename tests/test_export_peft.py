"""scripts/export_peft.py: LoRA, IA³ and LLaMA-Adapter v1 as PEFT adapters, checked against PEFT itself.

The oracle: ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base exported by
convert_to_hf>), <exported adapter>)`` must give the logits of our unmerged run (fp32, < 1e-5 relative).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.errors import UserError
from lit_adapter.export import convert_to_hf, export_peft
from test_export import cli, ids, make_base, make_run, rel_error, tok512  # noqa: F401 (fixtures)


def peft_logits(hf_base, adapter, idx):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


def _per_layer_gates(model):
    """One random gate per layer, the same for all its heads: what PEFT's one gate per layer can hold."""
    for block in model.transformer.h:
        if block.attn.adapter is not None:  # LLaMA-Adapter's prompt, in the attention hook slot
            block.attn.adapter.gating_factor.fill_(torch.randn(()).item())


@pytest.mark.parametrize("method, settings, name, tied, edit", [
    ("lora", dict(r=4, alpha=8, dropout=0.1), "tiny", False, None),
    ("lora", dict(r=2, alpha=5, key=True, projection=True, mlp=True, head=True), "tiny-gqa", True, None),
    ("ia3", None, "tiny-gqa", False, None),
    ("ia3", dict(targets=("q_proj", "o_proj", "up_proj", "down_proj"), feedforward=("o_proj", "down_proj")), "tiny",
     False, None),
    ("adapter", dict(prompt_length=3, start_layer=1), "tiny-gqa", False, _per_layer_gates),
    ("adapter", dict(prompt_length=4, start_layer=0), "tiny", True, _per_layer_gates),
], ids=["lora-qv", "lora-all-tied-head-gqa", "ia3-gqa", "ia3-input-scales", "adapter-gqa-top-layer",
        "adapter-all-layers"])
def test_peft_loads_the_export_with_the_logits_of_our_run(tmp_path, tok512, method, settings, name, tied, edit):
    base = make_base(tmp_path / "base", tok512, name, tie_embeddings=tied)
    final, model = make_run(tmp_path / "run", base, method, settings, edit=edit)
    convert_to_hf(tmp_path / "hf", checkpoint_dir=base)
    out = tmp_path / "peft"
    assert export_peft(final, out, base_model_name_or_path=str(tmp_path / "hf")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tmp_path / "hf")
    tensors = load_file(out / "adapter_model.safetensors")
    if method == "lora":
        assert config["peft_type"] == "LORA"
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (
            settings["r"], settings["alpha"], settings.get("dropout", 0.05))
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in tensors
    elif method == "ia3":
        assert config["peft_type"] == "IA3"
        assert tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 88)
    else:
        assert config["peft_type"] == "ADAPTION_PROMPT"
        assert (config["adapter_len"], config["adapter_layers"]) == (settings["prompt_length"],
                                                                      2 - settings["start_layer"])
        assert tensors["base_model.model.model.layers.1.self_attn.adaption_gate"].shape == (1,)
    idx = ids()
    with torch.no_grad():
        expected = model(idx)
    assert rel_error(peft_logits(tmp_path / "hf", out, idx), expected) < 1e-5


def test_adapter_gates_that_differ_per_head_are_refused_naming_the_layer(tmp_path, tok512):
    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, "adapter", dict(prompt_length=2, start_layer=0))
    with pytest.raises(UserError) as err:
        export_peft(final, tmp_path / "peft")
    message = str(err.value)
    assert message.startswith("PEFT cannot represent adapter: layer 0 has one gate per head (4 values")
    assert "one gate per layer" in message and not (tmp_path / "peft").exists()


def _zero_gates(model):
    for name, param in model.named_parameters():
        if "gating_factor" in name:
            param.zero_()


@pytest.mark.parametrize("method, settings, edit, fragment", [
    ("adapter_v2", dict(prompt_length=2, start_layer=1), _zero_gates, "PEFT has no per-linear bias and scale"),
    ("bitfit", None, None, "PEFT has no BitFit"),
    ("houlsby", None, None, "bottleneck adapters"),
    ("pfeiffer", None, None, "bottleneck adapters"),
    ("full", None, None, "a full fine-tune is a whole model"),
], ids=["adapter_v2", "bitfit", "houlsby", "pfeiffer", "full"])
def test_methods_peft_cannot_represent_are_one_line_naming_the_method(tmp_path, tok512, method, settings, edit,
                                                                      fragment):
    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, method, settings, edit=edit)
    with pytest.raises(UserError) as err:
        export_peft(final, tmp_path / "peft")
    assert str(err.value).startswith(f"PEFT cannot represent {method}: ") and fragment in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "peft").exists()


def test_sparse_attention_and_a_quantized_training(tmp_path, tok512, capsys):
    from lit_adapter.model.attention import AttentionConfig

    base = make_base(tmp_path / "base", tok512)
    sparse, _ = make_run(tmp_path / "sparse", base, "lora", attention=AttentionConfig(pattern="strided", stride=4))
    with pytest.raises(UserError, match="PEFT cannot represent lora: it was trained with strided sparse attention"):
        export_peft(sparse, tmp_path / "peft")
    qlora, _ = make_run(tmp_path / "qlora", base, "lora", recorded_quantize="bnb.nf4")
    export_peft(qlora, tmp_path / "peft")
    notes = capsys.readouterr().err
    assert "trained against a bnb.nf4-quantized base" in notes and "base_model_name_or_path is empty" in notes


def test_the_command_line(cli, tmp_path, tok512):  # noqa: F811 (the fixture)
    base = make_base(tmp_path / "base", tok512)
    final, _ = make_run(tmp_path / "run", base, "lora")
    out = tmp_path / "peft"
    code, stdout, _ = cli("scripts/export_peft.py", "--adapter_dir", final, "--output_dir", out)
    assert code == 0 and "adapter_model.safetensors" in stdout
    code, _, err = cli("scripts/export_peft.py", "--adapter_dir", final, "--output_dir", out)
    assert code == 2 and err.startswith("error: ") and "pass --overwrite true" in err and len(err.splitlines()) == 1
    code, _, err = cli("scripts/export_peft.py", "--adapter_dir", tmp_path, "--output_dir", tmp_path / "x")
    assert code == 2 and "adapter_config.json is missing" in err
    assert cli("scripts/export_peft.py", "--adapter_dir", final, "--output_dir", out, "--overwrite", "true")[0] == 0
    # the base's weights are not needed: with the recorded base gone, its recorded shape is enough
    base.rename(tmp_path / "moved")
    assert cli("scripts/export_peft.py", "--adapter_dir", final, "--output_dir", tmp_path / "again")[0] == 0
    code, _, err = cli("scripts/convert_to_hf.py", "--adapter_dir", final, "--merge", "true", "--output_dir",
                       tmp_path / "hf")
    assert code == 2 and "recorded in" in err and "pass --checkpoint_dir" in err
    assert cli("scripts/convert_to_hf.py", "--adapter_dir", final, "--merge", "true", "--checkpoint_dir",
               tmp_path / "moved", "--output_dir", tmp_path / "hf")[0] == 0
