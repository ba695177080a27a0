"""RoPE scaling (linear, dynamic NTK, YaRN, llama3) against HF ``LlamaForCausalLM`` built with the same rope_scaling,
past the pretrained window; the KV-cache path against the full forward; the config, converter and bad input."""

import json

import pytest
import torch

from lit_adapter.model.config import Config
from lit_adapter.convert import config_from_hf, convert_hf_checkpoint, hf_config_from_lit, lit_to_hf_state_dict
from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT
from lit_adapter.model.rope import build_rope_cache, inverse_frequencies

ORIGINAL = 32
# head_size 32: 16 frequency pairs, enough for YaRN's ramp and llama3's three bands to all be populated
BASE = dict(name="rope-test", block_size=ORIGINAL, vocab_size=512, n_layer=2, n_head=2, n_query_groups=1, n_embd=64,
            intermediate_size=88, rope_base=10000.0)
SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def scaled_model(kind: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = Config(**BASE).with_rope_scaling(SCALINGS[kind])
    model = GPT(config).eval()
    model.init_weights(std=0.2)
    return model


def hf_twin(model: GPT):
    """HF's LlamaForCausalLM from our config written back as an HF config dict, with our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_lit(model.config), attn_implementation="eager"))
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()), strict=True)
    return hf.eval()


def test_with_rope_scaling_sets_the_window():
    config = Config(**BASE).with_rope_scaling({"type": "linear", "factor": 4})
    assert config.block_size == 4 * ORIGINAL and config.original_block_size == ORIGINAL
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    assert config.describe_window() == "128 tokens (linear x4 of the pretrained 32)"
    assert config.with_rope_scaling(dict(config.rope_scaling)) is config  # recorded scaling re-applied: no change
    rescaled = config.with_rope_scaling({"type": "yarn", "factor": 8})  # replaces, relative to the original window
    assert (rescaled.block_size, rescaled.original_block_size) == (8 * ORIGINAL, ORIGINAL)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_logits_match_hf_past_the_window(kind):
    model = scaled_model(kind)
    hf = hf_twin(model)
    T = model.config.block_size  # 4x the pretrained window
    idx = torch.randint(0, 512, (2, T))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert rel(ours, theirs) < 1e-5
    # beyond the original window the scaling matters: plain RoPE gives other logits there
    with torch.no_grad():
        plain = GPT(Config(**dict(BASE, block_size=T))).eval()
        plain.load_state_dict(model.state_dict())
        assert rel(plain(idx)[:, ORIGINAL:], ours[:, ORIGINAL:]) > 1e-3
        if kind != "dynamic":  # dynamic NTK within the window is plain RoPE
            assert rel(plain(idx)[:, :ORIGINAL], ours[:, :ORIGINAL]) > 1e-4


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_tables_match_hf_rotary_embedding_bit_for_bit(kind):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = Config(**BASE).with_rope_scaling(SCALINGS[kind])
    hf = LlamaRotaryEmbedding(LlamaConfig(**hf_config_from_lit(config)))
    T = config.block_size
    positions = torch.arange(T)[None]
    cos_hf, sin_hf = hf(torch.zeros(1, dtype=torch.float32), positions)
    dynamic = T if kind == "dynamic" else None
    cos, sin = build_rope_cache(T, config.head_size, config.rope_base, None, config.rope_scaling, dynamic)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])


def test_dynamic_ntk_follows_the_sequence_length_like_a_fresh_hf_model():
    """Per call, the frequencies come from the call's length; HF's module also remembers the longest one."""
    model = scaled_model("dynamic")
    hf = hf_twin(model)
    idx = torch.randint(0, 512, (1, model.config.block_size))
    with torch.no_grad():
        for T in (20, ORIGINAL, 48, 100, 128):  # non-decreasing lengths: HF's memory is the current length
            assert rel(model(idx[:, :T]), hf(idx[:, :T]).logits) < 1e-5
        # HF's module now keeps the frequencies for 128 tokens; a 64-token call here uses those for 64
        ours = model(idx[:, :64])
        stale = hf(idx[:, :64]).logits
        fresh = hf_twin(model)(idx[:, :64]).logits
    assert rel(ours, fresh) < 1e-5
    assert rel(ours, stale) > 1e-4
    # a call shorter than the original window resets HF's module
    with torch.no_grad():
        hf(idx[:, :16])
        assert rel(model(idx[:, :64]), hf(idx[:, :64]).logits) < 1e-5
    # the table grows with the length seen, not beyond it
    inv_64, _ = inverse_frequencies(32, 10000.0, model.config.rope_scaling, 64)
    inv_128, _ = inverse_frequencies(32, 10000.0, model.config.rope_scaling, 128)
    assert (inv_128[1:] < inv_64[1:]).all() and inv_64[0] == inv_128[0] == 1.0


def _incremental(model: GPT, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    B, T = idx.shape
    model.set_kv_cache(batch_size=B, max_seq_length=T)
    try:
        out = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
        out += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(prefill, T)]
    finally:
        model.clear_kv_cache()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3", "dynamic"])
def test_kv_cache_agrees_with_the_full_forward_past_the_window(kind):
    model = scaled_model(kind)
    idx = torch.randint(0, 512, (2, model.config.block_size))
    with torch.no_grad():
        full = model(idx)
        incremental = _incremental(model, idx, prefill=24)
    if kind != "dynamic":
        assert rel(incremental, full) < 1e-5
        assert torch.equal(incremental.argmax(-1), full.argmax(-1))
        return
    # dynamic NTK: a forward's frequencies depend on its length, so the reference for the first positions is the
    # forward over the window alone; past it each step's key keeps its own step's frequencies (HF does the same,
    # test_greedy_decoding_matches_hf_generate), while one full forward rotates every key for the whole length
    with torch.no_grad():
        window = model(idx[:, :ORIGINAL])
    assert rel(incremental[:, :ORIGINAL], window) < 1e-5
    assert rel(incremental[:, ORIGINAL:], full[:, ORIGINAL:]) > 1e-4


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_greedy_decoding_matches_hf_generate(kind):
    """Greedy tokens and per-step logits of our KV-cache decoding against HF's generate, across the window."""
    from lit_adapter.generation.decode import generate

    model = scaled_model(kind, seed=1)
    hf = hf_twin(model)
    prompt = torch.randint(0, 512, (20,))
    n_new = model.config.block_size - prompt.numel()
    with torch.no_grad():
        ours = generate(model, prompt, n_new, temperature=0.0)
        theirs = hf.generate(prompt[None], max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        # our logits at every step, by re-running the same steps
        ours_logits = _incremental(model, ours[None, :-1], prefill=prompt.numel())[0, prompt.numel() - 1:]
    assert torch.equal(ours, theirs.sequences[0])
    assert rel(ours_logits, torch.cat(theirs.logits)) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# config, converter, command line


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_hf_config_round_trip(kind):
    config = Config(**BASE).with_rope_scaling(SCALINGS[kind])
    back = config_from_hf(json.loads(json.dumps(hf_config_from_lit(config))), name=config.name)
    assert back == config


def test_config_from_hf_reads_published_layouts():
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=2)
    # Llama 3.1: transformers 5's rope_parameters, a declared window larger than factor x original
    llama31 = config_from_hf(dict(base, max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert (llama31.block_size, llama31.original_block_size, llama31.rope_base) == (131072, 8192, 500000.0)
    # transformers 4's rope_scaling with "type": dynamic NTK scales relative to max_position_embeddings
    dynamic = config_from_hf(dict(base, max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert (dynamic.block_size, dynamic.original_block_size) == (8192, 4096)
    # YaRN without a factor: the ratio of the two windows (as HF computes it)
    yarn = config_from_hf(dict(base, max_position_embeddings=65536, rope_scaling={
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}))
    assert yarn.rope_scaling["factor"] == 16.0 and yarn.block_size == 65536
    with pytest.raises(UserError, match="does not implement: rope_scaling=.*longrope"):
        config_from_hf(dict(base, rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}))
    with pytest.raises(UserError, match="partial_rotary_factor=0.5"):
        config_from_hf(dict(base, partial_rotary_factor=0.5))


def test_converted_scaled_checkpoint_matches_hf(tmp_path, shared_data):
    from lit_adapter.checkpoint import load_checkpoint_dir
    from lit_adapter.data.tokenizer import llama2c_vocab_to_sentencepiece

    hf = hf_twin(scaled_model("yarn"))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(
        llama2c_vocab_to_sentencepiece(shared_data / "checkpoints" / "stories260K" / "tok512.bin"))
    config = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert config.rope_scaling["rope_type"] == "yarn" and config.block_size == 4 * ORIGINAL
    assert Config.from_file(tmp_path / "out" / "model_config.json") == config
    _, model, _ = load_checkpoint_dir(tmp_path / "out")
    idx = torch.randint(0, 512, (1, config.block_size))
    with torch.no_grad():
        assert rel(model(idx), hf(idx).logits) < 1e-5


@pytest.mark.parametrize("scaling, message", [
    ({"type": "linear", "factor": 1.0}, "factor must be a number > 1"),
    ({"type": "linear", "factor": 0.5}, "factor must be a number > 1"),
    ({"type": "linear"}, "linear needs factor"),
    ({"type": "ntk", "factor": 2}, "unknown type 'ntk'; choose one of linear, dynamic, yarn, llama3"),
    ({"type": "linear", "factor": 2, "facotr": 2}, "linear does not take facotr"),
    ({"type": "llama3", "factor": 8}, "llama3 needs low_freq_factor, high_freq_factor"),
    ({"type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 32}, "beta_fast must exceed beta_slow"),
    ({"type": "yarn", "rope_type": "linear", "factor": 4}, "two types"),
    ("linear", "must be a JSON object"),
])
def test_bad_rope_scaling_is_one_line(scaling, message):
    with pytest.raises(UserError, match=message) as err:
        Config(**BASE).with_rope_scaling(scaling)
    assert "\n" not in str(err.value)


def test_model_config_json_needs_the_original_window(tmp_path):
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(dict(BASE, block_size=128, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(UserError, match="yarn needs original_max_position_embeddings"):
        Config.from_file(path)
    path.write_text(json.dumps(dict(BASE, rope_scaling="linear")))
    with pytest.raises(UserError, match="rope_scaling must be dict"):
        Config.from_file(path)
    good = Config(**BASE).with_rope_scaling({"type": "yarn", "factor": 4})
    good.save(path)
    assert Config.from_file(path) == good
    with pytest.raises(UserError, match="original_max_position_embeddings=256 exceeds block_size=128"):
        Config(**dict(BASE, block_size=128, rope_scaling=dict(good.rope_scaling, original_max_position_embeddings=256)))


def test_past_the_scaled_window_is_refused():
    model = scaled_model("linear")
    with pytest.raises(UserError, match=r"sequence length=129 exceeds the scaled window, block_size=128 \(linear x4 "
                                        r"of the pretrained 32\); raise the factor.*\"factor\": 5"):
        model(torch.zeros(1, 129, dtype=torch.long))
    plain = GPT(Config(**BASE))
    with pytest.raises(UserError, match=r"block_size=32; extend it .*--model.rope_scaling '\{\"type\": \"linear\", "
                                        r"\"factor\": 2\}'"):
        plain(torch.zeros(1, 40, dtype=torch.long))
