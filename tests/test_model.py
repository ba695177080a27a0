import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_state_dict
from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT, num_parameters


def hf_reference(config: Config, model: GPT) -> LlamaForCausalLM:
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()), strict=True)
    return hf.eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf_transformers(name, tie):
    config = Config.from_name(name, tie_embeddings=tie)
    model = GPT(config)
    model.init_weights()
    hf = hf_reference(config, model)
    idx = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == (2, 37, config.vocab_size)
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel < 1e-5


def test_padded_vocab_is_cut_from_logits():
    config = Config.from_name("tiny", padded_vocab_size=576)
    model = GPT(config)
    model.init_weights()
    assert model.lm_head.weight.shape[0] == 576
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 512


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_kv_cache_matches_full_forward(name):
    config = Config.from_name(name)
    model = GPT(config).eval()
    model.init_weights()
    idx = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        prefill = model(idx[:, :12], input_pos=torch.arange(12))
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(12, 20)]
    incremental = torch.cat([prefill] + steps, dim=1)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    config = Config.from_name("tiny-gqa")
    model = GPT(config)
    model.init_weights()
    idx = torch.randint(0, config.vocab_size, (2, 16))
    model(idx).logsumexp(-1).mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = True
    model(idx).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=1e-5, atol=1e-6)


def test_meta_device_construction_allocates_nothing():
    with torch.device("meta"):
        model = GPT(Config.from_name("7B"))
    assert all(p.is_meta for p in model.parameters())
    # LLaMA 7B has 6,738,415,616 parameters (Touvron et al. 2023, Table 2 rounds it to 6.7B)
    assert num_parameters(model) == 6_738_415_616


def test_too_long_sequence_is_a_user_error():
    model = GPT(Config.from_name("tiny"))
    with pytest.raises(UserError, match="block_size=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_config_rejects_impossible_shapes():
    with pytest.raises(UserError, match="n_query_groups"):
        Config.from_name("tiny", n_query_groups=3)
    with pytest.raises(UserError, match="unknown model name"):
        Config.from_name("8B-typo")


def test_known_hidden_sizes():
    assert Config.from_name("7B").intermediate_size == 11008
    assert Config.from_name("stories260K").intermediate_size == 172
    assert Config.from_name("stories15M").intermediate_size == 768
    assert Config.from_name("stories42M").intermediate_size == 1376
    assert Config.from_name("stories110M").intermediate_size == 2048
