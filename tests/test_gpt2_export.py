"""Fine-tuned GPT-2 runs leave the project: merged into a GPT2LMHeadModel folder, or as a PEFT adapter on the
exported GPT-2 base (LoRA on HF's fused c_attn / c_proj / c_fc, IA³), each checked against transformers / PEFT
with the logits of our unmerged run; what PEFT cannot hold is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from family_fixtures import gpt2_tokenizer_dir
from lit_adapter.model.config import Config
from lit_adapter.convert import write_checkpoint_dir
from lit_adapter.errors import UserError
from lit_adapter.export import convert_to_hf, export_peft
from lit_adapter.model.gpt import GPT
from test_export import _zero_gates, _zero_head_bias, hf_logits, ids, make_run, rel_error
from test_export_peft import peft_logits


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory) -> Path:
    return gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2_tok")) / "tokenizer.json"


def make_gpt2_base(path: Path, tokenizer: Path, **overrides) -> Path:
    config = Config.from_name("tiny-gpt2", **overrides)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_f" in n or n.endswith("bias"):
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.1)
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
    write_checkpoint_dir(path, config, state, tokenizer)
    return path


@pytest.mark.parametrize("method, settings, edit", [
    ("lora", dict(r=4, alpha=8, key=True, projection=True, mlp=True, head=True), None),
    ("ia3", None, None),
    ("bitfit", None, None),
    ("adapter_v2", dict(prompt_length=3, start_layer=1), lambda m: (_zero_gates(m), _zero_head_bias(m))),
    ("full", None, None),
], ids=["lora-all-targets", "ia3", "bitfit-own-biases", "adapter_v2-zero-gates", "full"])
def test_merged_gpt2_run_loads_in_transformers_with_our_logits(tmp_path, gpt2_tokenizer, method, settings, edit):
    base = make_gpt2_base(tmp_path / "base", gpt2_tokenizer)
    final, model = make_run(tmp_path / "run", base, method, settings, edit=edit)
    convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"
    idx = ids()
    with torch.no_grad():
        expected = model(idx)
    assert rel_error(hf_logits(tmp_path / "hf", idx), expected) < 1e-5


@pytest.mark.parametrize("method, settings, targets", [
    ("lora", dict(r=4, alpha=8, dropout=0.1), ["attn.c_attn"]),
    ("lora", dict(r=2, alpha=5, key=True, projection=True, mlp=True, head=True),
     ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"]),
    ("lora", dict(r=3, alpha=6, query=False, value=False, mlp=True), ["mlp.c_fc", "mlp.c_proj"]),
    ("ia3", None, ["attn.c_attn", "mlp.c_proj"]),
], ids=["lora-qv-fused", "lora-all", "lora-mlp-only", "ia3"])
def test_peft_loads_the_gpt2_export_with_our_logits(tmp_path, gpt2_tokenizer, method, settings, targets):
    base = make_gpt2_base(tmp_path / "base", gpt2_tokenizer)
    final, model = make_run(tmp_path / "run", base, method, settings)
    convert_to_hf(tmp_path / "hf", checkpoint_dir=base)
    export_peft(final, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "hf"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == targets
    if method == "lora" and "attn.c_attn" in targets:  # q and v (and k) stacked: k * r on c_attn, alpha / r kept
        k = 3 if settings.get("key") else 2
        assert config["rank_pattern"] == {"c_attn": k * settings["r"]}
        assert config["alpha_pattern"] == {"c_attn": k * settings["alpha"]}
    idx = ids()
    with torch.no_grad():
        expected = model(idx)
    assert rel_error(peft_logits(tmp_path / "hf", tmp_path / "peft", idx), expected) < 1e-5


@pytest.mark.parametrize("method, settings, fragment", [
    ("bitfit", None, "trains base tensors in place .*merge it into the base"),
    ("ia3", dict(targets=("q_proj", "v_proj"), feedforward=("q_proj",)), "share one input in c_attn"),
    ("adapter", dict(prompt_length=3, start_layer=0), "LLaMA-Adapter prompts for LlamaForCausalLM only"),
    ("houlsby", None, "bottleneck"),
])
def test_what_peft_cannot_hold_on_gpt2_is_one_line(tmp_path, gpt2_tokenizer, method, settings, fragment):
    base = make_gpt2_base(tmp_path / "base", gpt2_tokenizer)
    final, _ = make_run(tmp_path / "run", base, method, settings)
    with pytest.raises(UserError, match=f"PEFT cannot represent .*{fragment}") as err:
        export_peft(final, tmp_path / "peft")
    assert "\n" not in str(err.value)


def test_a_quantized_merge_request_is_one_line(tmp_path, gpt2_tokenizer):
    base = make_gpt2_base(tmp_path / "base", gpt2_tokenizer)
    with pytest.raises(UserError, match="--quantize bnb.nf4: a quantized HF folder is not written here"):
        convert_to_hf(tmp_path / "hf", checkpoint_dir=base, quantize="bnb.nf4")
