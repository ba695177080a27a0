"""P-tuning against HF PEFT's PromptEncoderConfig (MLP and LSTM encoders) on our converted weights, the encoder
folded into final/, the 7B count, the memory estimate and runs of the training loop."""

import pytest
import torch
from test_training import run
import virtual_token_helpers as vt

from lit_adapter.train import run as training
from lit_adapter.errors import UserError
from lit_adapter.tuners.p_tuning import PTuningConfig

P = 4
RENAMES = {"embedding": "embedding.weight"}  # PEFT keeps the encoder's inputs in an nn.Embedding


def test_settings_are_validated():
    for bad in (dict(num_virtual_tokens=0), dict(encoder="gru"), dict(encoder_hidden_size=0),
                dict(encoder_num_layers=0), dict(encoder_dropout=1.0), dict(encoder_dropout=0.1),
                dict(encoder="lstm", encoder_num_layers=1, encoder_dropout=0.1)):
        with pytest.raises(UserError):
            PTuningConfig(**bad)


@pytest.mark.parametrize("name, encoder, hidden, layers", [
    ("tiny", "mlp", None, 2), ("tiny-gqa", "mlp", 24, 2), ("tiny", "lstm", 24, 2), ("tiny-gqa", "lstm", None, 1),
])
def test_matches_peft(name, encoder, hidden, layers):
    import peft

    base = vt.base_model(name)
    settings = PTuningConfig(num_virtual_tokens=P, encoder=encoder, encoder_hidden_size=hidden,
                             encoder_num_layers=layers)
    model = vt.method_model("p_tuning", base, settings)
    oracle = vt.peft_model(base, peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_reparameterization_type=encoder.upper(),
        encoder_hidden_size=hidden, encoder_num_layers=layers))
    vt.copy_into_peft(model, oracle, RENAMES)
    idx = torch.randint(0, base.config.vocab_size, (2, 10))
    vt.compare_with_peft(model, oracle, idx, RENAMES, real_offset=P)
    with torch.no_grad():  # no identity at initialisation, as in the reference
        assert vt.rel_err(model(idx), base(idx)) > 1e-2


def test_trainable_count_closed_form_and_7b_dry_run(capsys):
    C = H = 4096
    mlp = 20 * C + (C * H + H) + (H * H + H) + (H * C + C)  # inputs, then Linear(C,H), Linear(H,H), Linear(H,C)
    assert vt.dry_run_trainable("p_tuning", capsys) == mlp == 50_425_856
    C, H, L, P_ = 32, 24, 2, 3  # the LSTM: per layer and direction 4H x (input + H) weights and two 4H biases
    lstm = P_ * C + 2 * (4 * H * (C + H) + 8 * H) + 2 * (4 * H * (2 * H + H) + 8 * H) + (4 * H * H + 2 * H) \
        + (2 * H * C + C)
    settings = PTuningConfig(num_virtual_tokens=P_, encoder="lstm", encoder_hidden_size=H, encoder_num_layers=L)
    assert vt.ours_trainable(vt.method_model("p_tuning", vt.base_model("tiny"), settings)) == lstm


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_greedy_generation_with_and_without_kv_cache(encoder):
    settings = PTuningConfig(num_virtual_tokens=P, encoder=encoder, encoder_hidden_size=16)
    model = vt.method_model("p_tuning", vt.base_model("tiny-gqa", std=0.2), settings)
    vt.check_generation_with_and_without_cache(model)


def test_saved_activations_match_autograd():
    vt.check_saved_activations_match_autograd("p_tuning", PTuningConfig(num_virtual_tokens=7))


@pytest.mark.parametrize("kwargs", [dict(seq_len=128, micro_batch_size=2, config={"vocab_size": 4096}),
                                    dict(seq_len=200, micro_batch_size=1, precision="bf16-true")])
def test_estimate_within_15_percent_of_measured_cpu_peak(kwargs):
    measured, estimate = vt.estimate_vs_measured("p_tuning", PTuningConfig(num_virtual_tokens=16), **kwargs)
    print(f"measured {measured:,} estimated {estimate:,} ({100 * (estimate / measured - 1):+.2f}%)")
    assert abs(estimate / measured - 1) < 0.15


def test_training_resumes_with_the_encoder_and_final_holds_the_folded_embeddings(
        tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    settings = PTuningConfig(num_virtual_tokens=8, encoder="lstm", encoder_hidden_size=32)
    whole = vt.check_interrupted_run_resumes_exactly(tmp_path, stories_checkpoint, instruction_data, monkeypatch,
                                                  "p_tuning", settings, learning_rate=1e-3)
    assert whole.final_val_loss < whole.initial_val_loss
    # the resumable checkpoint keeps the encoder; final/ only its output
    resumable = torch.load(tmp_path / "whole" / training.CHECKPOINT_NAME, weights_only=True)["model"]
    assert any("lstm_head" in k for k in resumable) and any("mlp_head" in k for k in resumable)
    tensors, meta = vt.check_reloaded_final_matches_trained_model(tmp_path / "reload", stories_checkpoint, "p_tuning",
                                                               settings)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"virtual_tokens.embedding": (8, 64)}
    assert meta["settings"]["encoder"] == "none" and meta["trainable_params"] == 8 * 64


def test_trains_on_an_nf4_base(tmp_path, stories_checkpoint, instruction_data):
    result = run(tmp_path, stories_checkpoint, instruction_data, method="p_tuning", steps=4, quantize="bnb.nf4",
                 settings=PTuningConfig(num_virtual_tokens=8, encoder_hidden_size=64), learning_rate=1e-3)
    assert result.status == "completed" and result.final_val_loss < result.initial_val_loss
    # the base's linears are 4-bit, the encoder's stay trainable
    assert result.trainable_params == 8 * 64 + 3 * (64 * 64 + 64)
