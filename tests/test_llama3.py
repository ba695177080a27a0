"""Llama 3 / 3.1 / 3.2: published shapes, HF parity with llama3 RoPE scaling and GQA on random converted
checkpoints, the tiktoken-style tokenizer.json with its special tokens and chat template against HF's
AutoTokenizer, and export to an HF folder (rope_scaling written) and back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from family_fixtures import TRICKY, hf_llama3, llama3_tokenizer_dir
from lit_adapter.checkpoint import find_weights, load_checkpoint_dir, load_state_dict
from lit_adapter.model.config import Config
from lit_adapter.convert import convert_hf_checkpoint
from lit_adapter.export import convert_to_hf
from lit_adapter.model.gpt import GPT, num_parameters
from lit_adapter.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_llama3")
    hf_llama3(tie=request.param).save_pretrained(folder)
    llama3_tokenizer_dir(folder)
    return folder


@pytest.fixture(scope="module")
def lit_dir(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lit_llama3")
    convert_hf_checkpoint(hf_dir, out)
    return out


def ids(n: int = 60, vocab: int = 512) -> torch.Tensor:  # past the original window of 32: scaling matters
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name, params, tied, factor", [
    ("Llama-3-8B", 8_030_261_248, False, None), ("Llama-3.1-8B", 8_030_261_248, False, 8.0),
    ("Llama-3.2-1B", 1_235_814_400, True, 32.0)])
def test_published_shapes(name, params, tied, factor):
    config = Config.from_name(name)
    assert (config.vocab_size, config.rope_base, config.n_query_groups, config.tie_embeddings) == \
        (128256, 500000.0, 8, tied)
    assert (config.rope_scaling or {}).get("factor") == factor
    if factor:
        assert config.rope_scaling["rope_type"] == "llama3" and config.original_block_size == 8192
        assert config.block_size == 131072
    with torch.device("meta"):
        assert num_parameters(GPT(config)) == params


def test_converted_logits_equal_hf(hf_dir, lit_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    config, model, _ = load_checkpoint_dir(lit_dir)
    assert config.rope_scaling["rope_type"] == "llama3" and config.n_query_groups == 2
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() < 1e-5


def test_tokenizer_equals_hf_autotokenizer(hf_dir, lit_dir):
    for folder in (hf_dir, lit_dir):  # the HF folder and our converted checkpoint (its files copied)
        ours = Tokenizer(folder)
        theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
        assert ours.bos_id == theirs.convert_tokens_to_ids("<|begin_of_text|>") == theirs.bos_token_id
        assert ours.eos_id == theirs.convert_tokens_to_ids("<|end_of_text|>") and ours.vocab_size == len(theirs)
        for text in TRICKY:
            encoded = ours.encode(text, bos=True).tolist()
            assert encoded == theirs(text)["input_ids"], text
            assert ours.decode(encoded) == theirs.decode(encoded, skip_special_tokens=True), text
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there 😀"}]
        text = ours.apply_chat_template(messages)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.encode(text, bos=False).tolist() == \
            theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_export_loads_in_transformers_and_converts_back_bit_for_bit(lit_dir, tmp_path):
    convert_to_hf(tmp_path / "hf", checkpoint_dir=lit_dir)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "llama3" and written["rope_parameters"]["factor"] == 8.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, model, tok = load_checkpoint_dir(lit_dir)
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() < 1e-5
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "back")
    assert Config.from_checkpoint_dir(tmp_path / "back").rope_scaling == model.config.rope_scaling
    a, b = load_state_dict(find_weights(lit_dir)), load_state_dict(find_weights(tmp_path / "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [tok.encode(t).tolist() for t in TRICKY] == [hf_tok(t)["input_ids"] for t in TRICKY]


def test_perplexity_evaluation_equals_hf(hf_dir, lit_dir, shared_data, tmp_path):
    from family_fixtures import perplexity_matches_hf

    assert perplexity_matches_hf(lit_dir, hf_dir, shared_data, tmp_path, seqlen=96) > 1  # past the window of 32


def test_lora_export_loads_in_peft_with_our_logits(lit_dir, tmp_path):
    from test_export import ids as export_ids, make_run, rel_error
    from test_export_peft import peft_logits

    from lit_adapter.export import export_peft

    final, model = make_run(tmp_path / "run", lit_dir, "lora", dict(r=4, alpha=8, key=True, mlp=True))
    convert_to_hf(tmp_path / "hf", checkpoint_dir=lit_dir)
    export_peft(final, tmp_path / "peft")
    idx = export_ids()
    with torch.no_grad():
        expected = model(idx)
    assert rel_error(peft_logits(tmp_path / "hf", tmp_path / "peft", idx), expected) < 1e-5


def test_chat_generation_uses_the_chat_template(lit_dir, capsys):
    from lit_adapter.errors import UserError
    from lit_adapter.cli.generate import run_generation
    from lit_adapter.data.prompts import chat_prompt

    tok = Tokenizer(lit_dir)
    text = chat_prompt(tok, "Hi", system="Be brief.")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = run_generation(lit_dir, prompt="Hi", chat=True, system="Be brief.", max_new_tokens=3, temperature=0.0,
                         device="cpu", stream=False)
    assert len(out) == 1 and "<|" not in out[0]
    with pytest.raises(UserError, match="pass it as --prompt, not --instruction"):
        run_generation(lit_dir, instruction="Hi", chat=True, device="cpu")
