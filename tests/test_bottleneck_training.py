"""Houlsby and Pfeiffer adapters in the training engine on the real stories260K: they learn, ``final/`` holds only
the adapters and reloads to the same logits, an interrupted run resumes exactly, and quantized bases train."""

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.tuners import registry as methods
from lit_adapter.model.config import Config
from lit_adapter.tuners.registry import MethodSpec, load_finetuned, prepare_model
from lit_adapter.tuners.bottleneck import BottleneckAdapter, HoulsbyConfig, PfeifferConfig
from lit_adapter.tuners.base import tuner_layers

from test_training import run
from test_training import test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one as check_exact_resume


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_trains_and_final_reloads_to_the_same_logits(tmp_path, stories_checkpoint, instruction_data, monkeypatch,
                                                     method):
    trained = {}
    save = methods.save_adapter

    def keep_model(model, *args):
        trained["model"] = methods.unwrap(model)
        return save(model, *args)

    monkeypatch.setattr(methods, "save_adapter", keep_model)
    result = run(tmp_path, stories_checkpoint, instruction_data, method=method, steps=12, learning_rate=2e-2)
    assert result.status == "completed"
    assert result.final_val_loss < result.initial_val_loss - 0.1, result
    final = tmp_path / "final"
    tensors = load_file(final / "adapter.safetensors")
    assert set(tensors) == {n for n, p in trained["model"].named_parameters() if p.requires_grad}
    slots = ("attn_adapter", "mlp_adapter", "out_adapter")  # the block's hook slots
    assert all(name.split(".")[3] in slots for name in tensors) and result.trainable_params == sum(
        t.numel() for t in tensors.values())
    assert (final / "adapter.safetensors").stat().st_size < 100_000
    config, loaded, spec = load_finetuned(stories_checkpoint, final, torch.device("cpu"), torch.float32)
    adapters = len(tuner_layers(trained["model"], BottleneckAdapter))
    assert spec.method == method and len(tuner_layers(loaded, BottleneckAdapter)) == adapters
    idx = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx), trained["model"].eval()(idx))


# dropout in the adapters: the RNG state must come back too
@pytest.mark.parametrize("method, settings", [("houlsby", HoulsbyConfig(dropout=0.1)),
                                              ("pfeiffer", PfeifferConfig(non_linearity="gelu", dropout=0.1))])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, stories_checkpoint, instruction_data,
                                                                    monkeypatch, method, settings):
    check_exact_resume(tmp_path, stories_checkpoint, instruction_data, monkeypatch, method, settings, "adamw")


@pytest.mark.parametrize("method, quantize", [("houlsby", "bnb.nf4"), ("pfeiffer", "bnb.int8")])
def test_quantized_base_trains_on_cpu(tmp_path, stories_checkpoint, instruction_data, method, quantize):
    import bitsandbytes as bnb

    result = run(tmp_path, stories_checkpoint, instruction_data, method=method, steps=8, quantize=quantize,
                 learning_rate=2e-2)
    assert result.final_val_loss < result.initial_val_loss
    model = prepare_model(MethodSpec(method, quantize=quantize), Config.from_checkpoint_dir(stories_checkpoint),
                          stories_checkpoint, torch.device("cpu"), torch.float32)
    layers = (bnb.nn.Linear4bit if quantize == "bnb.nf4" else bnb.nn.Linear8bitLt, torch.nn.Linear)
    # every block linear is quantized (the head stays full precision); the adapters stay float and alone train
    assert {type(m) for n, m in model.named_modules() if isinstance(m, layers)} == {layers[0], torch.nn.Linear}
    assert all(p.requires_grad == ("_adapter." in n) for n, p in model.named_parameters())
    adapters = tuner_layers(model, BottleneckAdapter).values()
    assert all(p.dtype == torch.float32 for a in adapters for p in a.parameters())
    # the trained adapters reload onto a quantized base and run there
    config, loaded, _ = load_finetuned(stories_checkpoint, tmp_path / "final", torch.device("cpu"), torch.float32,
                                       quantize=quantize)
    assert torch.isfinite(loaded(torch.randint(0, config.vocab_size, (1, 16)))).all()
