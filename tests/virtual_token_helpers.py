"""What the tests of prompt tuning, P-tuning and prefix tuning share: the HF PEFT oracle on our converted weights,
parameter copies, loss/gradient comparisons and the decoding, memory and training checks run for each method."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from hf_oracle import hf_llama

from lit_adapter.model.config import Config
from lit_adapter.memory import Cell
from lit_adapter.tuners.registry import MethodSpec, count_parameters, get_method, mark_trainable
from lit_adapter.model.gpt import GPT


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def base_model(name: str = "tiny", std: float = 0.02, **overrides) -> GPT:
    model = GPT(Config.from_name(name, **overrides))
    model.init_weights(std)
    return model.eval()


def method_model(method: str, base: GPT, settings) -> GPT:
    """``method`` built around ``base``'s weights (its own tensors at their initial values), trainable marked."""
    spec = MethodSpec(method, settings)
    model = spec.definition.build(base.config, spec.settings)
    report = model.load_state_dict(base.state_dict(), strict=False)
    assert report.unexpected_keys == [] and all(k.startswith("virtual_tokens.") for k in report.missing_keys)
    mark_trainable(model, spec)
    return model.eval()


def peft_model(base: GPT, peft_config):
    import peft

    return peft.get_peft_model(hf_llama(base).eval(), peft_config).eval()


def copy_into_peft(model: GPT, peft_model, renames=None) -> None:
    """Copies our ``virtual_tokens.<name>`` tensors into PEFT's ``prompt_encoder.default.<renames[name]>``; every
    trainable PEFT tensor must be written exactly once."""
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    prefix = "prompt_encoder.default."
    written = set()
    with torch.no_grad():
        for name, param in model.virtual_tokens.named_parameters():
            target = prefix + (renames or {}).get(name, name)
            theirs[target].copy_(param)
            written.add(target)
    assert written == set(theirs), set(theirs) ^ written


def peft_trainable(peft_model) -> int:
    return peft_model.get_nb_trainable_parameters()[0]


def ours_trainable(model: GPT) -> int:
    return count_parameters(model, requires_grad=True)


def loss_of(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every logit differently, so every gradient direction is checked."""
    return (logits * weights).sum()


def compare_with_peft(model: GPT, peft_model, idx: torch.Tensor, renames=None, real_offset: int = 0) -> None:
    """Logits on the real tokens and the gradients of every trained tensor, ours against PEFT's, fp32, < 1e-5.

    PEFT's logits of prompt/P-tuning include the virtual rows first (``real_offset`` of them); ours never do.
    """
    ours = model(idx)  # (B, T, V)
    theirs = peft_model(input_ids=idx).logits[:, real_offset:]
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-5
    weights = torch.randn_like(ours)
    loss_of(ours, weights).backward()
    loss_of(theirs, weights).backward()
    theirs_params = dict(peft_model.named_parameters())
    for name, param in model.virtual_tokens.named_parameters():
        other = theirs_params["prompt_encoder.default." + (renames or {}).get(name, name)]
        assert param.grad is not None and param.grad.abs().max() > 0, name
        assert rel_err(param.grad, other.grad) < 1e-5, name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("virtual_tokens."))
    assert ours_trainable(model) == peft_trainable(peft_model)


def greedy_without_cache(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    idx = prompt.clone()
    for _ in range(steps):
        logits = model(idx[None])[0, -1]
        idx = torch.cat([idx, logits.argmax()[None]])
    return idx


def check_generation_with_and_without_cache(model: GPT, steps: int = 20) -> None:
    """``generate_tokens`` with the KV cache gives the same greedy tokens as full forwards without it, and
    incremental decoding the same logits as one full forward."""
    from lit_adapter.generation.decode import generate

    prompt = torch.randint(0, model.config.vocab_size, (6,))
    with torch.no_grad():
        reference = greedy_without_cache(model, prompt, steps)
        full = model(reference[None])
        model.set_kv_cache(batch_size=1)
        chunks = [model(reference[None, :6], input_pos=torch.arange(6))]
        for t in range(6, reference.numel()):
            chunks.append(model(reference[None, t:t + 1], input_pos=torch.tensor([t])))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert generate(model, prompt, max_new_tokens=steps, temperature=0.0).tolist() == reference.tolist()


def dry_run_trainable(method: str, capsys) -> int:
    """The trainable count printed by ``finetune/<method>.py --model_name 7B --dry_run true``."""
    from jsonargparse import CLI
    from test_scripts import load_setup

    CLI(load_setup(method), args=["--model_name", "7B", "--dry_run", "true"], as_positional=False)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("trainable parameters: "))
    return int(line.split(": ")[1])


@dataclass
class SettingsCell(Cell):
    """A memory measurement cell with the method's settings (``Cell`` uses the defaults)."""

    settings: Any = None

    def spec(self) -> MethodSpec:
        return replace(super().spec(), settings=self.settings)


def estimate_vs_measured(method: str, settings=None, **cell_kwargs):
    """(measured CPU allocator peak, estimated peak) of training steps on random weights of a small model."""
    from lit_adapter.memory import estimate_memory, measure_step

    overrides = {**dict(name="small", block_size=256, vocab_size=1000, n_layer=3, n_head=4, n_embd=64,
                        intermediate_size=192), **cell_kwargs.pop("config", {})}
    cell = SettingsCell(method=method, settings=settings, model_name=None, config_overrides=overrides, steps=2,
                        timed_steps=0, **cell_kwargs)
    measured = measure_step(cell)["peak_bytes"]
    estimate = estimate_memory(cell.config(), cell.spec(), cell.micro_batch_size, cell.seq_len, cell.precision,
                               activation_checkpointing=cell.activation_checkpointing, loss=cell.loss)["peak_bytes"]
    return measured, estimate


def trainable_names(method: str, settings) -> set:
    spec = MethodSpec(method, settings)
    with torch.device("meta"):
        model = get_method(method).build(Config.from_name("tiny"), spec.settings)
    return {n for n, _ in model.named_parameters() if spec.definition.trainable(n)}


def check_interrupted_run_resumes_exactly(tmp_path, checkpoint, data, monkeypatch, method, settings, steps=4,
                                         **train_overrides):
    """A run stopped by SIGINT after optimizer step 2 and resumed ends exactly like an uninterrupted one."""
    import os
    import signal

    import pytest
    from safetensors.torch import load_file
    from test_training import run

    from lit_adapter.train import run as training

    kwargs = dict(method=method, steps=steps, settings=settings, **train_overrides)
    whole = run(tmp_path / "whole", checkpoint, data, **kwargs)
    original = training.lr_at

    def interrupt_after_step_2(step, total, train):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(step, total, train)

    monkeypatch.setattr(training, "lr_at", interrupt_after_step_2)
    with pytest.raises(SystemExit):
        run(tmp_path / "split", checkpoint, data, **kwargs)
    monkeypatch.setattr(training, "lr_at", original)
    assert not (tmp_path / "split" / "final").exists()
    resumed = run(tmp_path / "split", checkpoint, data, resume=True, **kwargs)
    assert resumed.train_losses == whole.train_losses
    assert resumed.final_val_loss == whole.final_val_loss
    tw, ts = (load_file(tmp_path / name / "final" / "adapter.safetensors") for name in ("whole", "split"))
    assert tw.keys() == ts.keys() and all(torch.equal(tw[k], ts[k]) for k in tw)
    return whole


def check_reloaded_final_matches_trained_model(tmp_path, checkpoint, method, settings, steps: int = 3):
    """A model trained in memory for a few steps, saved with ``save_adapter`` and reloaded with
    ``load_finetuned``, gives the same logits; returns the saved tensors and ``adapter_config.json``."""
    import json

    from safetensors.torch import load_file

    from lit_adapter.tuners.registry import load_finetuned, prepare_model, save_adapter

    spec = MethodSpec(method, settings)
    config = Config.from_checkpoint_dir(checkpoint)
    model = prepare_model(spec, config, checkpoint, torch.device("cpu"), torch.float32).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, config.vocab_size, (2, 24))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    save_adapter(model, spec, config, checkpoint, tmp_path / "final")
    _, reloaded, _ = load_finetuned(checkpoint, tmp_path / "final", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert rel_err(reloaded(idx), model(idx)) < 1e-6
        check_generation_with_and_without_cache(reloaded, steps=8)
    meta = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    return load_file(tmp_path / "final" / "adapter.safetensors"), meta


def check_saved_activations_match_autograd(method: str, settings) -> None:
    """The estimator's saved set, block by block and for the head, against autograd's (fp32/bf16, MHA/GQA, fused
    and math SDPA); the encoder's few activations, counted in the embedding section, are not modelled."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lit_adapter.memory import build_random_model, measure_saved_activations, saved_activations

    small = dict(name="small", block_size=256, vocab_size=1000, n_layer=3, n_head=4, n_embd=64, intermediate_size=192)
    for precision, groups, B, T, sdpa in [("32-true", 4, 2, 48, "flash"), ("bf16-true", 2, 1, 37, "flash"),
                                          ("32-true", 2, 2, 40, "math")]:
        cell = SettingsCell(method=method, settings=settings, model_name=None, precision=precision, seq_len=T,
                            micro_batch_size=B, config_overrides={**small, "n_query_groups": groups})
        model = build_random_model(cell, torch.device("cpu")).train()
        with sdpa_kernel(SDPBackend.MATH) if sdpa == "math" else contextlib.nullcontext():
            measured = measure_saved_activations(model, torch.randint(0, 1000, (B, T)))
        predicted = saved_activations(cell.config(), cell.spec(), B, T, precision, sdpa=sdpa)
        assert measured["layers"] == predicted["layers"], (precision, groups, sdpa)
        assert measured["head"] == predicted["head"], (precision, groups, sdpa)
