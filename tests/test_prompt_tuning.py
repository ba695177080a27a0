"""Prompt tuning against HF PEFT's PromptTuningConfig on our converted weights (random and text initialisation),
the virtual-token mechanics every prompt method shares (positions, KV cache, block size, sparse patterns), the
7B count, the memory estimate, and runs of the training loop."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from test_training import run
import virtual_token_helpers as vt

from lit_adapter.model.attention import AttentionConfig, apply_attention
from lit_adapter.checkpoint import save_state_dict
from lit_adapter.errors import UserError
from lit_adapter.tuners.prompt_tuning import PromptTuningConfig, repeat_to_length

P = 5


def hooked(attn, q, k, v, input_pos=None):
    """The layer's attention as the model computes it: through the method's module in its attention hook slot."""
    return attn.adapter(attn, q, k, v, input_pos)


def test_settings_are_validated():
    for bad in (dict(num_virtual_tokens=0), dict(num_virtual_tokens=2.0), dict(init="vocab"), dict(init="text")):
        with pytest.raises(UserError):
            PromptTuningConfig(**bad)
    assert repeat_to_length([4, 5], 5) == [4, 5, 4, 5, 4] and repeat_to_length([1, 2, 3], 2) == [1, 2]


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_matches_peft(name):
    import peft

    base = vt.base_model(name)
    model = vt.method_model("prompt_tuning", base, PromptTuningConfig(num_virtual_tokens=P))
    oracle = vt.peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    # both start at N(0, 1) (PEFT's RANDOM is an nn.Embedding's own initialisation)
    ours_init, theirs_init = model.virtual_tokens.embedding, oracle.prompt_encoder.default.embedding.weight
    assert 0.9 < ours_init.std().item() < 1.1 and 0.9 < theirs_init.std().item() < 1.1
    vt.copy_into_peft(model, oracle, {"embedding": "embedding.weight"})
    idx = torch.randint(0, base.config.vocab_size, (2, 11))
    vt.compare_with_peft(model, oracle, idx, {"embedding": "embedding.weight"}, real_offset=P)
    # no identity at initialisation, in the reference as here: the prompt changes every real token's logits
    with torch.no_grad():
        assert vt.rel_err(model(idx), base(idx)) > 1e-2


def _checkpoint_dir(tmp_path, base, shared_data):
    """A converted checkpoint folder of ``base`` with the LLaMA tokenizer (for the 32k-vocabulary configs)."""
    out = tmp_path / "checkpoint"
    out.mkdir()
    save_state_dict(base.state_dict(), out / "lit_model.safetensors")
    base.config.save(out / "model_config.json")
    shutil.copyfile(shared_data / "tokenizers" / "llama" / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.mark.parametrize("text", ["Classify the sentiment of this review", "Once upon a time, there was a little"
                                  " girl named Lily who loved to play outside"])
def test_text_initialisation_matches_peft(tmp_path, shared_data, text):
    import peft

    from lit_adapter.tuners.registry import MethodSpec, prepare_model

    base = vt.base_model("tiny-32k")
    checkpoint = _checkpoint_dir(tmp_path, base, shared_data)
    spec = MethodSpec("prompt_tuning", PromptTuningConfig(num_virtual_tokens=8, init="text", init_text=text))
    model = prepare_model(spec, base.config, checkpoint, torch.device("cpu"), torch.float32).eval()
    # PEFT reads the tokenizer with AutoTokenizer; a folder with only tokenizer.model adds no BOS either
    oracle = vt.peft_model(base, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(checkpoint)))
    assert torch.equal(model.virtual_tokens.embedding, oracle.prompt_encoder.default.embedding.weight)
    idx = torch.randint(0, base.config.vocab_size, (2, 9))
    vt.compare_with_peft(model, oracle, idx, {"embedding": "embedding.weight"}, real_offset=8)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_greedy_generation_with_and_without_kv_cache(name):
    model = vt.method_model("prompt_tuning", vt.base_model(name, std=0.2), PromptTuningConfig(num_virtual_tokens=P))
    vt.check_generation_with_and_without_cache(model)


def test_context_of_real_and_virtual_tokens_beyond_block_size_is_a_one_line_error():
    model = vt.method_model("prompt_tuning", vt.base_model(), PromptTuningConfig(num_virtual_tokens=P))
    block = model.config.block_size
    model(torch.zeros(1, block - P, dtype=torch.long))  # exactly fits
    for call in (lambda: model(torch.zeros(1, block - P + 1, dtype=torch.long)),
                 lambda: model.set_kv_cache(1, max_seq_length=block - P + 1)):
        with pytest.raises(UserError, match=f"{P} virtual tokens") as info:
            call()
        assert "\n" not in str(info.value)
    # generation stops where real and virtual tokens fill the context
    from lit_adapter.generation.decode import generate

    prompt = torch.zeros(block - P - 3, dtype=torch.long)
    assert generate(model, prompt, max_new_tokens=10, temperature=0.0).numel() == block - P
    with pytest.raises(UserError, match="context"):
        generate(model, torch.zeros(block - P + 1, dtype=torch.long), max_new_tokens=1)
    from lit_adapter.tuners.registry import MethodSpec

    with pytest.raises(UserError, match="no room"):
        MethodSpec("prompt_tuning", PromptTuningConfig(num_virtual_tokens=block)).validate(model.config)


def _dense_reference(kernel, q, k, v):
    """Causal attention over [virtual; real] rows where the pattern holds among the real ones only."""
    nh, T = q.shape[1], q.shape[2] - P
    pattern = kernel.dense_mask(nh, T).expand(nh, T, T)
    mask = torch.ones(nh, P + T, P + T, dtype=torch.bool).tril()
    mask[:, P:, P:] = pattern
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])


@pytest.mark.parametrize("pattern", [dict(pattern="local", window=3), dict(pattern="strided", stride=4),
                                     dict(pattern="fixed", block_size=4, summary_size=1),
                                     dict(pattern="shifted", group_size=6)])
def test_sparse_patterns_let_every_query_see_the_virtual_tokens(pattern):
    settings = PromptTuningConfig(num_virtual_tokens=P)
    model = vt.method_model("prompt_tuning", vt.base_model("tiny-gqa", std=0.2), settings)
    apply_attention(model, AttentionConfig(**pattern))
    attn = model.transformer.h[0].attn
    q, k, v = (torch.randn(2, 4, P + 30, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(hooked(attn, q, k, v), _dense_reference(attn.attention_kernel,
                                                                                            q, k, v))
    # through the model: the last of 40 tokens depends on the prompt although its window is far from it
    idx = torch.randint(0, 512, (1, 40))
    model.train()
    model(idx)[0, -1].logsumexp(-1).backward()
    assert model.virtual_tokens.embedding.grad.abs().max() > 0
    model.eval()
    vt.check_generation_with_and_without_cache(model)


def test_dry_run_counts_7b(capsys):
    assert vt.dry_run_trainable("prompt_tuning", capsys) == 20 * 4096  # num_virtual_tokens x n_embd


def test_saved_activations_match_autograd():
    vt.check_saved_activations_match_autograd("prompt_tuning", PromptTuningConfig(num_virtual_tokens=7))


@pytest.mark.parametrize("kwargs", [dict(seq_len=128, micro_batch_size=2, config={"vocab_size": 4096}),
                                    dict(seq_len=256, micro_batch_size=1, precision="bf16-true",
                                         config={"block_size": 512}, activation_checkpointing=True)])
def test_estimate_within_15_percent_of_measured_cpu_peak(kwargs):
    measured, estimate = vt.estimate_vs_measured("prompt_tuning", PromptTuningConfig(num_virtual_tokens=16), **kwargs)
    print(f"measured {measured:,} estimated {estimate:,} ({100 * (estimate / measured - 1):+.2f}%)")
    assert abs(estimate / measured - 1) < 0.15


def test_training_resumes_exactly_and_final_reloads(tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    settings = PromptTuningConfig(num_virtual_tokens=8)
    whole = vt.check_interrupted_run_resumes_exactly(tmp_path, stories_checkpoint, instruction_data, monkeypatch,
                                                  "prompt_tuning", settings, learning_rate=3e-2)
    assert whole.final_val_loss < whole.initial_val_loss
    tensors, meta = vt.check_reloaded_final_matches_trained_model(tmp_path / "reload", stories_checkpoint,
                                                               "prompt_tuning", settings)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"virtual_tokens.embedding": (8, 64)}
    assert meta["trainable_params"] == 8 * 64


def test_trains_on_an_int8_base(tmp_path, stories_checkpoint, instruction_data):
    result = run(tmp_path, stories_checkpoint, instruction_data, method="prompt_tuning", steps=4,
                 quantize="bnb.int8", settings=PromptTuningConfig(num_virtual_tokens=8), learning_rate=3e-2)
    assert result.status == "completed" and result.final_val_loss < result.initial_val_loss


@pytest.mark.parametrize("method, doc", [("prompt_tuning", "Length of the soft prompt"),
                                         ("p_tuning", "Hidden size H of the encoder"),
                                         ("prefix_tuning", "Reparameterise the prefixes through an MLP")])
def test_help_documents_the_settings(capsys, method, doc):
    from jsonargparse import CLI, set_parsing_settings
    from test_scripts import load_setup

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    with pytest.raises(SystemExit):
        CLI(load_setup(method), args=["--help"], as_positional=False)
    text = capsys.readouterr().out
    assert f"--{method}.num_virtual_tokens" in text and doc in text
