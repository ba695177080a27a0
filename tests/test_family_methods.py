"""Every registered PEFT method on both new families (tiny random GPT-2 and Llama 3 configs): it builds on the
base checkpoint, a forward and backward reach every trainable tensor, and generation runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_adapter.checkpoint import save_state_dict
from lit_adapter.model.config import Config
from lit_adapter.generation.decode import generate
from lit_adapter.tuners.registry import METHODS, MethodSpec, prepare_model
from lit_adapter.model.gpt import GPT


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama3"])
def base_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    config = Config.from_name(request.param)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    save_state_dict(model.state_dict(), folder / "lit_model.safetensors")
    config.save(folder / "model_config.json")
    return folder


SETTINGS = {  # every layer and linear the method can reach, so no part of either family goes untested
    "adapter": {"start_layer": 0}, "adapter_v2": {"start_layer": 0},
    "lora": {"query": True, "key": True, "value": True, "projection": True, "mlp": True, "head": True},
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_generates(base_dir, method):
    config = Config.from_checkpoint_dir(base_dir)
    spec = MethodSpec(method, SETTINGS.get(method))
    spec.validate(config)
    torch.manual_seed(0)
    model = prepare_model(spec, config, base_dir, torch.device("cpu"), torch.float32)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, method
    x = torch.randint(0, config.vocab_size, (2, 12))
    model.train()
    logits = model(x)
    assert logits.shape == (2, 12, config.vocab_size) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), x[:, 1:].reshape(-1)).backward()
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        out = generate(model, x[0, :5], max_new_tokens=4)
    assert out.shape == (9,) and out[:5].tolist() == x[0, :5].tolist()


def test_bitfit_trains_gpt2s_own_biases(tmp_path):
    config = Config.from_name("tiny-gpt2")
    model = GPT(config)
    save_state_dict(model.state_dict(), tmp_path / "lit_model.safetensors")
    config.save(tmp_path / "model_config.json")
    model = prepare_model(MethodSpec("bitfit"), config, tmp_path, torch.device("cpu"), torch.float32)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(".bias") for n in trainable), trainable
    assert not any("bitfit_bias" in n for n in trainable)
    assert "transformer.h.0.attn.q_proj.bias" in trainable and "transformer.h.1.mlp.down_proj.bias" in trainable


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_qlora_on_a_quantized_base_with_biases(tmp_path, mode):
    """QLoRA on GPT-2 (its quantized linears keep their float biases) and on Llama 3; widths of 64 (see
    tests/test_lora.py for bitsandbytes' CPU kernels at other widths)."""
    pytest.importorskip("bitsandbytes")
    for name in ("tiny-gpt2", "tiny-llama3"):
        config = Config.from_name(name, n_embd=64, intermediate_size=128)
        torch.manual_seed(0)
        model = GPT(config)
        model.init_weights()
        folder = tmp_path / name
        folder.mkdir()
        save_state_dict(model.state_dict(), folder / "lit_model.safetensors")
        config.save(folder / "model_config.json")
        q = prepare_model(MethodSpec("lora", quantize=mode), config, folder, torch.device("cpu"), torch.float32)
        x = torch.randint(0, config.vocab_size, (2, 10))
        with torch.no_grad():
            close = (q(x) - model(x)).abs().max() / model(x).abs().max()
        assert close < 0.2, (name, mode, close)  # the quantized base computes nearly the float model
        q(x).sum().backward()
        assert all(p.grad is not None for p in q.parameters() if p.requires_grad)
        if config.bias:  # the quantized linears kept their biases, frozen
            assert q.transformer.h[0].attn.q_proj.linear.bias is not None


def test_context_truncation_with_byte_level_tokenizers(tmp_path):
    """The context policy cuts the input at a token boundary of GPT-2's and Llama 3's tokenizers too (their
    token_spans are byte offsets; a token may straddle the input's end), and the response stays whole."""
    from family_fixtures import gpt2_tokenizer_dir, llama3_tokenizer_dir
    from lit_adapter.data.prompts import InstructionRecord
    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.data.truncation import encode_record, fit_record

    record = InstructionRecord("Summarise the review.", "A long, rambling review: café 😀 " * 30 + "the end.",
                               "Too long.")
    for tok in (Tokenizer(gpt2_tokenizer_dir(tmp_path / "gpt2")), Tokenizer(llama3_tokenizer_dir(tmp_path / "l3"))):
        full, _ = encode_record(record, tok)
        fitted = fit_record(record, tok, len(full) - 40, policy="context")
        ids = fitted.example["input_ids"]
        assert fitted.context_shortened and not fitted.response_cut and len(ids) <= len(full) - 40
        assert tok.decode(ids).endswith("### Response:\nToo long.")
