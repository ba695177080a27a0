"""GPT-2 in our one model file: shapes, HF parity on random converted checkpoints, the byte-level BPE tokenizer
against HF's AutoTokenizer, export to an HF folder and back bit for bit, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from family_fixtures import TRICKY, gpt2_tokenizer_dir, hf_gpt2
from lit_adapter.checkpoint import find_weights, load_checkpoint_dir, load_state_dict
from lit_adapter.model.config import Config
from lit_adapter.convert import config_from_hf, convert_hf_checkpoint
from lit_adapter.errors import UserError
from lit_adapter.export import convert_to_hf
from lit_adapter.generation.decode import generate
from lit_adapter.model.gpt import GPT, num_parameters
from lit_adapter.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random HF GPT-2 folder (save_pretrained) with a tiny GPT-2 tokenizer (vocab.json, merges.txt, json)."""
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf_gpt2().save_pretrained(folder)
    gpt2_tokenizer_dir(folder)
    return folder


@pytest.fixture(scope="module")
def lit_dir(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lit_gpt2")
    convert_hf_checkpoint(hf_dir, out)
    return out


def ids(n: int = 20, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                          ("gpt2-large", 774_030_080)])
def test_published_sizes(name, params):
    config = Config.from_name(name)
    assert (config.vocab_size, config.block_size, config.norm_class, config.position_embedding) == \
        (50257, 1024, "LayerNorm", "learned")
    with torch.device("meta"):
        model = GPT(config)
    assert num_parameters(model) == params  # HF's GPT2LMHeadModel counts (tied head)


def test_converted_logits_equal_hf(hf_dir, lit_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    config, model, _ = load_checkpoint_dir(lit_dir)
    assert config.tie_embeddings and config.bias and config.gelu_approximate == "tanh"
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() < 1e-5
        # KV-cache decoding with learned positions equals the full forward
        model.set_kv_cache(2)
        steps = [model(x[:, :12], torch.arange(12))] + [model(x[:, i:i + 1], torch.tensor([i])) for i in range(12, 20)]
        assert (torch.cat(steps, 1) - hf(x).logits).abs().max() < 1e-5


def test_greedy_generation_equals_hf(hf_dir, lit_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    _, model, _ = load_checkpoint_dir(lit_dir)
    prompt = ids(8)[0]
    ours = generate(model, prompt, max_new_tokens=10, temperature=0.0)
    theirs = hf.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=0)[0]
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("files", ["vocab", "json"])
def test_tokenizer_equals_hf_autotokenizer(tmp_path, files):
    folder = gpt2_tokenizer_dir(tmp_path / files, files=files)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    ours, theirs = Tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.bos_id == -1 and ours.eos_id == theirs.eos_token_id and ours.vocab_size == len(theirs)
    for text in TRICKY:
        encoded = ours.encode(text, bos=True).tolist()  # GPT-2 has no BOS: bos=True adds nothing, as in HF
        assert encoded == theirs(text)["input_ids"], text
        assert ours.decode(encoded) == theirs.decode(encoded, skip_special_tokens=True), text
        assert ours.encode(text, eos=True).tolist() == encoded + [ours.eos_id]
    assert [t.tolist() for t in ours.encode_batch(TRICKY, bos=True)] == [theirs(t)["input_ids"] for t in TRICKY]
    text = "emoji 😀🚀 café"
    spans = ours.token_spans(text)
    assert len(spans) == len(ours.encode(text, bos=False))
    raw = text.encode()
    assert spans[-1][1] == len(raw) and all(raw[:end].decode() is not None for _, end in spans)


def test_export_loads_in_transformers_and_converts_back_bit_for_bit(lit_dir, tmp_path):
    files = convert_to_hf(tmp_path / "hf", checkpoint_dir=lit_dir)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json"} <= set(files)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    _, model, tok = load_checkpoint_dir(lit_dir)
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() < 1e-5
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "back")
    a, b = load_state_dict(find_weights(lit_dir)), load_state_dict(find_weights(tmp_path / "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [tok.encode(t).tolist() for t in TRICKY] == [hf_tok(t)["input_ids"] for t in TRICKY]


def test_unsupported_architectures_and_variants_are_one_line(tmp_path, hf_dir):
    folder = tmp_path / "mistral"
    shutil.copytree(hf_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UserError, match="unsupported architecture: .*'mistral' \\(MistralForCausalLM\\)"):
        convert_hf_checkpoint(folder, tmp_path / "out")
    base = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=512)
    with pytest.raises(UserError, match="GPT-2 features .* scale_attn_by_inverse_layer_idx=True"):
        config_from_hf(dict(base, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(UserError, match="activation_function='relu'"):
        config_from_hf(dict(base, activation_function="relu"))
    with pytest.raises(UserError, match="rope_scaling needs rotary positions"):
        Config.from_name("tiny-gpt2", rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                    "original_max_position_embeddings": 64}, block_size=128)


def test_old_model_configs_load_as_llama(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps({"name": "old", "vocab_size": 512, "n_layer": 2, "n_head": 4, "n_embd": 32,
                                "intermediate_size": 88}))
    config = Config.from_file(path)
    assert (config.norm_class, config.mlp_class, config.bias, config.position_embedding) == \
        ("RMSNorm", "LLaMAMLP", False, "rope")
    with pytest.raises(UserError, match="norm_class='BatchNorm' is not one of RMSNorm, LayerNorm"):
        Config.from_name("tiny", norm_class="BatchNorm")


def test_perplexity_evaluation_equals_hf(hf_dir, lit_dir, shared_data, tmp_path):
    from family_fixtures import perplexity_matches_hf

    assert perplexity_matches_hf(lit_dir, hf_dir, shared_data, tmp_path, seqlen=64) > 1


def test_chat_without_a_template_is_one_line(lit_dir):
    from lit_adapter.cli.generate import run_generation

    with pytest.raises(UserError, match="has no chat template"):
        run_generation(lit_dir, prompt="Hi", chat=True, device="cpu")


def test_lm_eval_adapter_has_no_bos_on_gpt2(lit_dir):
    pytest.importorskip("lm_eval")
    from lit_adapter.evaluation.lm_eval_adapter import LitAdapterLM

    _, model, tok = load_checkpoint_dir(lit_dir)
    lm = LitAdapterLM(model=model, tokenizer=tok, add_bos_token=True)
    assert not lm.add_bos_token and lm.prefix_token_id == tok.eos_id >= 0  # lm-eval's HFLM: EOT for GPT-2


def test_hub_layout_without_prefix_and_with_mask_buffers(hf_dir, lit_dir):
    """The hub's gpt2 files name tensors without ``transformer.`` and old .bin files hold the causal-mask buffers."""
    from lit_adapter.convert.gpt2 import hf_gpt2_to_lit

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    raw = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    raw["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    raw["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    config = Config.from_checkpoint_dir(lit_dir)
    ours = load_state_dict(find_weights(lit_dir))
    converted = hf_gpt2_to_lit(raw, config)
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)
    with pytest.raises(UserError, match="not part of GPT2LMHeadModel: h.0.attn.rotary"):
        hf_gpt2_to_lit({"h.0.attn.rotary.weight": torch.ones(1)}, config)
