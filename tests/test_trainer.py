"""The Trainer's step on its own: its loss pinned, the update it makes equal to a hand-written AdamW step, gradient
accumulation equal to the whole batch, the method's parameter groups in its optimizer; the benchmark and the memory
measurement run that very step; an out-of-memory error while saving or resuming is never "does not fit"."""

import copy
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from lit_adapter.train import trainer as trainer_module
from lit_adapter.errors import UserError
from lit_adapter.train.fabric_setup import make_fabric
from lit_adapter.train.losses import forward_loss
from lit_adapter.memory import Cell, build_random_model, measure_step
from lit_adapter.train.optim import build_optimizer
from lit_adapter.train.trainer import Trainer, TrainState, load_resumable, method_optimizer, save_resumable

REPO = Path(__file__).resolve().parents[1]


def _cell(**kw):
    settings = dict(method="lora", model_name="stories260K", seq_len=32, micro_batch_size=2, precision="32-true",
                    device="cpu", method_settings={"r": 4, "alpha": 8, "dropout": 0.0})
    return Cell(**{**settings, **kw})


def _batch(cell, seed=0):
    ids = torch.randint(0, cell.config().vocab_size, (cell.micro_batch_size, cell.seq_len),
                        generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _trainer(cell, batches, accum=1, model=None, loss="cross_entropy"):
    model = model if model is not None else build_random_model(cell, torch.device("cpu"))
    model.train()
    optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-2, weight_decay=0.02, betas=(0.9, 0.95))
    fabric = make_fabric("cpu", precision=cell.precision)
    model, optimizer = fabric.setup(model, optimizer)
    return Trainer(fabric, model, optimizer, batches, accum=accum, loss=loss, max_grad_norm=1.0)


def test_step_pins_its_loss_and_counts_its_state():
    torch.manual_seed(0)
    cell = _cell()
    trainer = _trainer(cell, itertools.repeat(_batch(cell)))
    results = [trainer.step() for _ in range(3)]
    # LoRA (r=4) on random stories260K weights, seed 0, one repeated batch at lr 1e-2: the loss falls
    assert [r.loss for r in results] == pytest.approx([6.25366, 6.1966, 6.15526], abs=1e-5)
    assert all(r.tokens == 2 * 32 and r.grad_norm > 0 for r in results)
    state = trainer.state
    assert state.step == 3 and state.tokens == 3 * 64 and state.train_time > 0
    assert state.train_losses == [(i + 1, r.loss) for i, r in enumerate(results)]


def test_step_is_a_plain_clipped_adamw_step():
    """The update of Trainer.step equals forward, backward, clip_grad_norm_ and torch's AdamW written by hand."""
    torch.manual_seed(0)
    cell = _cell()
    model = build_random_model(cell, torch.device("cpu"))
    reference = copy.deepcopy(model)
    batch = _batch(cell)
    trainer = _trainer(cell, itertools.repeat(batch), model=model)
    result = trainer.step()

    reference.train()
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.02, betas=(0.9, 0.95))
    loss = forward_loss(reference, batch["input_ids"], batch["labels"])[0]
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    trained = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-7)


def test_two_accumulated_micro_batches_make_the_step_of_the_whole_batch():
    torch.manual_seed(0)
    whole_cell, half_cell = _cell(micro_batch_size=2), _cell(micro_batch_size=1)
    batch = _batch(whole_cell)
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    model = build_random_model(whole_cell, torch.device("cpu"))
    twin = copy.deepcopy(model)
    whole = _trainer(whole_cell, iter([batch]), model=model).step()
    split = _trainer(half_cell, iter(halves), accum=2, model=twin).step()
    assert split.loss == pytest.approx(whole.loss, rel=1e-6) and split.tokens == whole.tokens == 64
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_methods_parameter_groups_reach_the_optimizer(monkeypatch):
    cell = _cell()
    model = build_random_model(cell, torch.device("cpu"))
    spec = cell.spec()
    default = spec.definition.param_groups(model, spec.settings, 1e-3, 0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(default) == 1 and default[0]["lr"] == 1e-3 and default[0]["weight_decay"] == 0.02
    assert [id(p) for p in default[0]["params"]] == [id(p) for p in trainable]

    def b_at_four_times(model, settings, learning_rate, weight_decay):  # LoRA+'s shape of groups
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if "lora_B" not in n]},
                {"params": [p for n, p in named if "lora_B" in n], "lr": 4 * learning_rate}]

    monkeypatch.setattr(type(spec.definition), "param_groups", staticmethod(b_at_four_times))
    for name in ("adamw", "adamw8bit"):
        optimizer = method_optimizer(model, spec, name, lr=1e-3, weight_decay=0.02, betas=(0.9, 0.95))
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 4e-3]
        assert all(g["weight_decay"] == 0.02 for g in optimizer.param_groups)
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    # a schedule scales every group's own rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    assert scheduler.get_last_lr() == [5e-4, 2e-3]


def test_the_benchmark_and_the_measurement_run_the_trainers_step(monkeypatch):
    calls = []
    original = Trainer.step

    def counted(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(Trainer, "step", counted)
    result = measure_step(_cell(steps=2, timed_steps=1))
    assert len(calls) == 3 and result["status"] == "ok" and result["loss"] == calls[-1].state.train_losses[-1][1]

    spec = importlib.util.spec_from_file_location("finetune_throughput", REPO / "benchmarks" / "finetune_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["finetune_throughput"] = bench
    spec.loader.exec_module(bench)
    job = dict(method="lora", size="stories260K", seq_len=16, micro_batch_size=2, precision="32-true", device="cpu",
               our_loss="cross_entropy", threads=1)
    calls.clear()
    side = bench._Side(job, "ours")
    batch = bench._token_batch(job, side.model.config.vocab_size)
    assert side.step(batch) > 0 and side.step(batch) > 0
    assert len(calls) == 2 and calls[0] is side.trainer and side.trainer.state.step == 2


def test_bf16_true_keeps_the_logits_in_bf16_and_trains_with_every_loss():
    """Fabric's bf16-true would hand the loss float32 logits (a float32 (B, T, V) copy) and the head-chunked loss
    float32 hidden states for a bf16 head, which failed; make_fabric keeps the model's dtype and no number changes."""
    cell = _cell(precision="bf16-true")
    batch = _batch(cell)
    trainer = _trainer(cell, itertools.repeat(batch))
    assert trainer.model(batch["input_ids"]).dtype == torch.bfloat16
    first = {}
    for loss in ("cross_entropy", "chunked", "chunked_head"):
        torch.manual_seed(0)
        first[loss] = _trainer(cell, itertools.repeat(batch), loss=loss).step().loss
    assert first["chunked"] == pytest.approx(first["cross_entropy"], rel=1e-6)
    assert first["chunked_head"] == pytest.approx(first["cross_entropy"], rel=1e-6)


# ------------------------------------------------------------------------------- out of memory vs "does not fit"

def _saved_checkpoint(tmp_path, cell):
    trainer = _trainer(cell, itertools.repeat(_batch(cell)))
    trainer.step()
    path = tmp_path / "last.ckpt"
    state = trainer_module.checkpoint_state(trainer.model, trainer.optimizer, None, trainer.state)
    save_resumable(trainer.fabric, state, path, cell.spec(), trainer.model)
    return path


def _resume_into(cell, path):
    trainer = _trainer(cell, ())
    fresh = trainer_module.checkpoint_state(trainer.model, trainer.optimizer, None, TrainState())
    return load_resumable(trainer.fabric, fresh, path, trainer.model, cell.spec())


def test_resume_loads_what_was_saved_with_the_keys_last_ckpt_always_had(tmp_path):
    path = _saved_checkpoint(tmp_path, _cell())
    saved = torch.load(path, weights_only=True)
    # the pre-Trainer loop's state dict (older checkpoints keep loading), plus the per-category validation losses,
    # which a checkpoint without them reads as none (TrainState.from_dict)
    assert set(saved) == {"model", "optimizer", "scheduler", "step", "train_losses", "val_losses", "rng", "tokens",
                          "train_time", "best_val", "val_category_losses"}
    assert TrainState.from_dict({k: v for k, v in saved.items() if k != "val_category_losses"}).val_category_losses == []
    state = TrainState.from_dict(_resume_into(_cell(), path))
    assert state.step == 1 and state.tokens == 64 and len(state.train_losses) == 1
    assert torch.equal(state.rng, saved["rng"])


def test_out_of_memory_while_resuming_propagates_as_itself(tmp_path, monkeypatch):
    cell = _cell()
    path = _saved_checkpoint(tmp_path, cell)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(Fabric, "load", oom)
    with pytest.raises(torch.OutOfMemoryError):
        _resume_into(cell, path)
    monkeypatch.undo()

    def host_oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(torch, "load", host_oom)
    with pytest.raises(MemoryError):
        _resume_into(cell, path)


def test_a_genuine_mismatch_while_resuming_is_still_one_line(tmp_path, monkeypatch):
    path = _saved_checkpoint(tmp_path, _cell())
    other_rank = _cell(method_settings={"r": 8, "alpha": 16, "dropout": 0.0})
    with pytest.raises(UserError, match=r"does not fit this run's lora: \d+ shape mismatches: .*lora_A: checkpoint \(4, 64\) vs model \(8, 64\)"):
        _resume_into(other_rank, path)

    def mismatch(*args, **kwargs):  # what torch raises for optimizer state of another shape
        raise RuntimeError("size mismatch for exp_avg: copying a param with shape [4, 64]")

    monkeypatch.setattr(Fabric, "load", mismatch)
    with pytest.raises(UserError, match=r"does not fit this run \(RuntimeError: size mismatch") as info:
        _resume_into(_cell(), path)
    assert "\n" not in str(info.value)


def test_out_of_memory_while_saving_is_not_a_failed_write(tmp_path, monkeypatch):
    cell = _cell()
    trainer = _trainer(cell, itertools.repeat(_batch(cell)))
    trainer.step()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(Fabric, "save", oom)
    state = trainer_module.checkpoint_state(trainer.model, trainer.optimizer, None, trainer.state)
    with pytest.raises(torch.OutOfMemoryError):
        save_resumable(trainer.fabric, state, tmp_path / "last.ckpt", cell.spec(), trainer.model)
    assert not list(tmp_path.iterdir())


def test_build_optimizer_takes_groups():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5000))
    for name in ("adamw", "adamw8bit"):
        optimizer = build_optimizer([{"params": [a]}, {"params": [b], "lr": 2e-3}], name, lr=1e-3)
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 2e-3]
