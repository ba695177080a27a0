"""Prefix tuning against HF PEFT's PrefixTuningConfig (with and without the MLP) on our converted weights, the
relative attention weights between content tokens (seed 004, 3.2.b), sparse patterns, the MLP folded into
final/, the 7B count, the memory estimate and runs of the training loop."""

import pytest
import torch
import torch.nn.functional as F
from test_training import run
import virtual_token_helpers as vt

from lit_adapter.train import run as training
from lit_adapter.model.attention import AttentionConfig, apply_attention
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import MethodSpec
from lit_adapter.tuners.prefix_tuning import PrefixTuningConfig

P = 3
RENAMES = {"embedding": "embedding.weight"}  # PEFT keeps the (MLP's input or the) prefixes in an nn.Embedding
SPARSE = [dict(pattern="local", window=3), dict(pattern="strided", stride=4),
          dict(pattern="fixed", block_size=4, summary_size=1), dict(pattern="shifted", group_size=6)]


def hooked(attn, q, k, v, input_pos=None):
    """The layer's attention as the model computes it: through the method's module in its attention hook slot."""
    return attn.adapter(attn, q, k, v, input_pos)


def test_settings_are_validated():
    for bad in (dict(num_virtual_tokens=0), dict(num_virtual_tokens=True), dict(encoder_hidden_size=0)):
        with pytest.raises(UserError):
            PrefixTuningConfig(**bad)


@pytest.mark.parametrize("name, projection, hidden", [
    ("tiny", True, 16), ("tiny-gqa", True, None), ("tiny", False, None), ("tiny-gqa", False, None),
])
def test_matches_peft(name, projection, hidden):
    """PEFT passes the prefixes as HF past_key_values: no RoPE on them, the real tokens at positions P.. ."""
    import peft

    base = vt.base_model(name)
    settings = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=hidden)
    model = vt.method_model("prefix_tuning", base, settings)
    oracle = vt.peft_model(base, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=hidden))
    vt.copy_into_peft(model, oracle, RENAMES)
    idx = torch.randint(0, base.config.vocab_size, (2, 10))
    vt.compare_with_peft(model, oracle, idx, RENAMES)
    with torch.no_grad():  # no identity at initialisation, as in the reference
        assert vt.rel_err(model(idx), base(idx)) > 1e-2


def _layer_with_prefix(pattern=None, T=12):
    """Layer 0's attention hook with a random prefix of keys and zero values, for one-hot value probes."""
    model = vt.method_model("prefix_tuning", vt.base_model("tiny-gqa"), PrefixTuningConfig(num_virtual_tokens=P))
    if pattern:
        apply_attention(model, AttentionConfig(**pattern))
    attn = model.transformer.h[0].attn
    ng = model.config.n_query_groups
    keys = torch.randn(model.config.n_layer, 1, ng, P, T, dtype=torch.float64) * 2
    attn.adapter.shared_prefixes.kv = torch.cat([keys, torch.zeros_like(keys)], dim=1)  # (n_layer, 2, ng, P, T)
    return attn


@pytest.mark.parametrize("pattern", [None, *SPARSE])
def test_relative_attention_weights_between_content_tokens_are_unchanged(pattern):
    """Seed 004, 3.2.b: A~[i, p+j] / A~[i, p+k] = A[i, j] / A[i, k]. One-hot values (v_j = e_j, prefix values 0)
    make the output row i the content part of the attention weights."""
    T = 12
    attn = _layer_with_prefix(pattern, T)
    q = torch.randn(2, 4, T, T, dtype=torch.float64) * 2
    k = torch.randn(2, 2, T, T, dtype=torch.float64) * 2  # grouped: tiny-gqa's 4 query heads in 2 groups
    v = torch.eye(T, dtype=torch.float64).expand(2, 2, T, T)
    with_prefix = hooked(attn, q, k, v)  # (B, nh, T, T): A~[i, p + j]
    kernel = attn.attention_kernel
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # the reference repeats them itself
    without = F.scaled_dot_product_attention(q, k4, v4, is_causal=True) if kernel is None else kernel(q, k4, v4)
    content_share = with_prefix.sum(-1, keepdim=True)
    assert (content_share < 1).all() and content_share.mean() < 0.9  # the prefix takes a share of attention ...
    torch.testing.assert_close(with_prefix / content_share, without, rtol=1e-10, atol=1e-12)  # ... not the ratios
    visible = without > 0
    ratio = with_prefix[..., :, None] / with_prefix[..., None, :]  # (B, nh, T, j, k) for visible j, k
    expected = without[..., :, None] / without[..., None, :]
    both = visible[..., :, None] & visible[..., None, :]
    torch.testing.assert_close(ratio[both], expected[both], rtol=1e-10, atol=0)


@pytest.mark.parametrize("pattern", SPARSE)
def test_sparse_patterns_let_every_query_see_the_prefix(pattern):
    T = 30
    attn = _layer_with_prefix(pattern, T=8)
    q = torch.randn(2, 4, T, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, T, 8, dtype=torch.float64) for _ in range(2))  # grouped (B, ng, T, hs)
    attn.adapter.shared_prefixes.kv[0, 1] = torch.randn(2, P, 8, dtype=torch.float64)  # (ng, P, hs)
    prefixes = attn.adapter.shared_prefixes.kv[0]
    pk, pv = (t.expand(2, -1, -1, -1) for t in prefixes)  # (B, ng, P, hs)
    mask = torch.cat([torch.ones(4, T, P, dtype=torch.bool), attn.attention_kernel.dense_mask(4, T).expand(4, T, T)],
                     dim=-1)
    # the reference repeats every key/value group for its query heads itself
    reference = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2).repeat_interleave(2, 1),
                                               torch.cat([pv, v], 2).repeat_interleave(2, 1), attn_mask=mask[None])
    torch.testing.assert_close(hooked(attn, q, k, v), reference)
    # and in a decoding step, through the kernel's KV-cache path
    S = P + T
    cached_k, cached_v = torch.cat([torch.zeros_like(pk), k], 2), torch.cat([torch.zeros_like(pv), v], 2)
    pos = torch.tensor([T - 1])
    torch.testing.assert_close(hooked(attn, q[:, :, -1:], cached_k, cached_v, pos + P),
                               reference[:, :, -1:])
    assert cached_k.shape[-2] == S


@pytest.mark.parametrize("name, projection, pattern", [("tiny", True, None), ("tiny-gqa", False, None),
                                                       ("tiny-gqa", True, SPARSE[0])])
def test_greedy_generation_with_and_without_kv_cache(name, projection, pattern):
    settings = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=16)
    model = vt.method_model("prefix_tuning", vt.base_model(name, std=0.2), settings)
    if pattern:
        apply_attention(model, AttentionConfig(**pattern))
    vt.check_generation_with_and_without_cache(model)


def test_trainable_count_closed_form_and_7b_dry_run(capsys):
    P_, kv, H, L = 20, 4096, 512, 32  # the MLP: Linear(kv, H), Tanh, Linear(H, L * 2 * kv)
    assert vt.dry_run_trainable("prefix_tuning", capsys) == P_ * kv + (kv * H + H) + (H * L * 2 * kv + L * 2 * kv) \
        == 136_659_456


def test_saved_activations_match_autograd():
    vt.check_saved_activations_match_autograd("prefix_tuning", PrefixTuningConfig(num_virtual_tokens=7))


@pytest.mark.parametrize("kwargs", [dict(seq_len=128, micro_batch_size=2, config={"vocab_size": 4096}),
                                    dict(seq_len=200, micro_batch_size=1, precision="bf16-true",
                                         config={"n_query_groups": 2}),
                                    dict(seq_len=256, micro_batch_size=2, activation_checkpointing=True,
                                         config={"block_size": 512})])
def test_estimate_within_15_percent_of_measured_cpu_peak(kwargs):
    settings = PrefixTuningConfig(num_virtual_tokens=16, encoder_hidden_size=64)
    measured, estimate = vt.estimate_vs_measured("prefix_tuning", settings, **kwargs)
    print(f"measured {measured:,} estimated {estimate:,} ({100 * (estimate / measured - 1):+.2f}%)")
    assert abs(estimate / measured - 1) < 0.15


def test_estimator_refuses_virtual_tokens_with_sparse_attention_and_the_dry_run_says_so(capsys):
    from lit_adapter.model.config import Config
    from lit_adapter.memory import estimate_memory

    spec = MethodSpec("prefix_tuning", attention=AttentionConfig(pattern="local", window=64))
    with pytest.raises(UserError, match="dense attention only") as info:
        estimate_memory(Config.from_name("tiny"), spec, 1, 64)
    assert "\n" not in str(info.value)
    from jsonargparse import CLI
    from test_scripts import load_setup

    CLI(load_setup("prefix_tuning"), args=["--model_name", "7B", "--dry_run", "true", "--attention.pattern", "local"],
        as_positional=False)
    assert "peak memory estimate: not available (the memory estimator models trained rows or keys" in capsys.readouterr().out


def test_training_resumes_with_the_mlp_and_final_holds_the_computed_prefixes(
        tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    settings = PrefixTuningConfig(num_virtual_tokens=8, encoder_hidden_size=32)
    whole = vt.check_interrupted_run_resumes_exactly(tmp_path, stories_checkpoint, instruction_data, monkeypatch,
                                                  "prefix_tuning", settings, learning_rate=1e-2)
    assert whole.final_val_loss < whole.initial_val_loss
    resumable = torch.load(tmp_path / "whole" / training.CHECKPOINT_NAME, weights_only=True)["model"]
    assert any("transform" in k for k in resumable)
    tensors, meta = vt.check_reloaded_final_matches_trained_model(tmp_path / "reload", stories_checkpoint,
                                                               "prefix_tuning", settings)
    # stories260K: 5 layers, 4 key/value heads of 8
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"virtual_tokens.embedding": (8, 5 * 2 * 32)}
    assert meta["settings"]["prefix_projection"] is False


def test_trains_on_an_int8_base_with_a_sparse_pattern(tmp_path, stories_checkpoint, instruction_data):
    result = run(tmp_path, stories_checkpoint, instruction_data, method="prefix_tuning", steps=4,
                 quantize="bnb.int8", attention=AttentionConfig(pattern="local", window=32),
                 settings=PrefixTuningConfig(num_virtual_tokens=8, encoder_hidden_size=32), learning_rate=1e-2)
    assert result.status == "completed" and result.final_val_loss < result.initial_val_loss
    assert result.trainable_params == 8 * 32 + (32 * 32 + 32) + (32 * 320 + 320)


@pytest.mark.parametrize("method, settings", [("prefix_tuning", PrefixTuningConfig(num_virtual_tokens=P)),
                                              ("p_tuning", None)])
def test_activation_checkpointing_gives_the_same_gradients(method, settings):
    """A checkpointed block recomputed in the backward reads the same prefixes (or virtual rows) as the forward."""
    base = vt.base_model("tiny-gqa")
    idx = torch.randint(0, 512, (2, 9))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = vt.method_model(method, base, settings).train()
        model.gradient_checkpointing = checkpointing
        model(idx).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)
