"""Padding-free packing (issue 23): a packed row's examples are each computed as if alone, for every method and
sparse pattern (logits, loss and gradients); the packed batch format, the token budget and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from lit_adapter.model.attention import AttentionConfig
from lit_adapter.model.config import Config
from lit_adapter.tuners.registry import METHODS, MethodSpec, build_model, mark_trainable
from lit_adapter.train.losses import forward_loss

LENGTHS = (7, 16, 3, 11)


def tiny(**overrides) -> Config:
    return Config.from_name("tiny", **{"block_size": 64, **overrides})


def method_model(method: str, pattern: str = "dense", config: Config = None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config or tiny()
    attention = {"dense": AttentionConfig(), "local": AttentionConfig(pattern="local", window=4),
                 "strided": AttentionConfig(pattern="strided", stride=3),
                 "fixed": AttentionConfig(pattern="fixed", block_size=5, summary_size=2),
                 "shifted": AttentionConfig(pattern="shifted", group_size=4)}[pattern]
    spec = MethodSpec(method, attention=attention)
    if hasattr(spec.settings, "start_layer"):
        spec.settings.start_layer = 0  # an adaption prompt in every layer of the tiny model
    model = build_model(spec, config)
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") and not list(m.children()) else None)
    with torch.no_grad():  # every added tensor non-zero (zero-initialised gates and LoRA B would hide the method)
        for p in model.parameters():
            if p.is_floating_point() and not p.is_meta:
                p.add_(torch.randn_like(p) * 0.05)
    mark_trainable(model, spec)
    if not any(p.requires_grad for p in model.parameters()):
        for p in model.parameters():
            p.requires_grad_(True)
    return model.float().eval()  # no dropout: the two runs must see the same function


def examples(lengths=LENGTHS, vocab: int = 100, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a prompt that is not a target
        out.append({"input_ids": ids, "labels": labels})
    return out


def packed(batch):
    from lit_adapter.data.packing import collate_packed

    return collate_packed(batch)


def one_by_one_and_packed(model, batch):
    """(logits alone, loss sum alone, grads alone), the same for the packed row."""
    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    logits, total, count = [], 0.0, 0
    for ex in batch:
        logits.append(model(ex["input_ids"][None])[0])
        loss, n = forward_loss(model, ex["input_ids"][None], ex["labels"][None])
        total, count = total + loss * n, count + n
    (total / count).backward()
    alone = (torch.cat(logits), total / count, grads())
    row = packed(batch)
    logits = model(row["input_ids"], cu_seqlens=row["cu_seqlens"])[0]
    loss, n = forward_loss(model, row["input_ids"], row["labels"], cu_seqlens=row["cu_seqlens"])
    assert n == count
    loss.backward()
    return alone, (logits, loss, grads())


@pytest.mark.parametrize("method", METHODS)
def test_packed_equals_one_by_one_for_every_method(method):
    model = method_model(method)
    (la, sa, ga), (lp, sp, gp) = one_by_one_and_packed(model, examples())
    torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp, sa, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gp.keys() and ga
    for name in ga:
        torch.testing.assert_close(gp[name], ga[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pattern", ["local", "strided", "fixed", "shifted"])
@pytest.mark.parametrize("method", ["lora", "adapter", "prefix_tuning"])
def test_packed_sparse_patterns_apply_inside_each_example(method, pattern):
    model = method_model(method, pattern)
    lengths = (8, 12, 4, 16) if pattern == "shifted" else LENGTHS
    (la, sa, ga), (lp, sp, gp) = one_by_one_and_packed(model, examples(lengths))
    torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp, sa, rtol=1e-6, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(gp[name], ga[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ the step's gradient


class RecordGradients(torch.optim.Optimizer):
    """An optimizer that only keeps the gradients the step hands it (no update: the steps stay comparable)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])


def step_batches(batch, micro_batch_size: int, packing: bool, world_size: int = 1, rank: int = 0):
    """One step's micro-batches of ``batch`` for this rank: padded groups of ``micro_batch_size`` (the padded
    sampler's order), or the packed sampler's spread of the same examples."""
    from lit_adapter.data.instructions import collate_instructions
    from lit_adapter.data.packing import collate_packed, spread

    bins = len(batch) // micro_batch_size
    if packing:
        lengths = [len(ex["input_ids"]) for ex in batch]
        groups = spread(list(range(len(batch))), lengths, bins, micro_batch_size * max(lengths), 0)
        return [collate_packed([batch[i] for i in g]) for g in groups[rank::world_size]]
    groups = [list(range(i * micro_batch_size, (i + 1) * micro_batch_size)) for i in range(bins)]
    return [collate_instructions([batch[i] for i in g]) for g in groups[rank::world_size]]


def step_gradient(fabric, model, batch, micro_batch_size: int, packing: bool):
    from lit_adapter.train.trainer import Trainer

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = RecordGradients(trainable)
    batches = step_batches(batch, micro_batch_size, packing, fabric.world_size, fabric.global_rank)
    trainer = Trainer(fabric, model, optimizer, batches, accum=len(batches), max_grad_norm=None)
    result = trainer.step()
    return result.loss, optimizer.seen[0]


STEP_LENGTHS = (9, 30, 4, 17, 12, 25, 6, 21)


def assert_same_gradient(a, b, rel: float = 1e-6):
    for x, y in zip(a, b):
        assert (x - y).norm() <= rel * y.norm() + 1e-12, f"{(x - y).norm() / y.norm():.2e}"


def test_a_steps_gradient_does_not_depend_on_its_micro_batches_padded_or_packed():
    """fp32, one process: micro-batches of 1, 2, 4 and 8 of the same 8 examples, padded or packed, give the same
    loss (the step's mean over its target tokens) and the same gradient (relative 1e-6)."""
    from lit_adapter.train.fabric_setup import make_fabric

    fabric = make_fabric("cpu", precision="32-true")
    model = fabric.setup_module(method_model("lora"))
    batch = examples(STEP_LENGTHS)
    reference_loss, reference = step_gradient(fabric, model, batch, 8, packing=False)
    targets = sum(int((ex["labels"][1:] != -100).sum()) for ex in batch)
    total = sum(forward_loss(model, ex["input_ids"][None], ex["labels"][None])[0].item()
                * int((ex["labels"][1:] != -100).sum()) for ex in batch)
    assert reference_loss == pytest.approx(total / targets, rel=1e-6)  # what a logged loss means
    for micro_batch_size in (1, 2, 4, 8):
        for packing in (False, True):
            loss, grads = step_gradient(fabric, model, batch, micro_batch_size, packing)
            assert loss == pytest.approx(reference_loss, rel=1e-6)
            assert_same_gradient(grads, reference)


@pytest.mark.slow
def test_a_steps_gradient_is_the_same_on_two_ddp_processes(tmp_path):
    """Two DDP CPU processes (gloo): each rank's share of the same 8 examples, padded or packed, in micro-batches
    of 1, 2 or 4, gives the one-process step's loss and gradient (relative 1e-6)."""
    import subprocess
    import sys
    from pathlib import Path

    from lit_adapter.train.fabric_setup import make_fabric

    fabric = make_fabric("cpu", precision="32-true")
    model = fabric.setup_module(method_model("lora"))
    reference_loss, reference = step_gradient(fabric, model, examples(STEP_LENGTHS), 8, packing=False)
    worker = Path(__file__).with_name("packing_ddp_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path / "ddp.pt")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "ddp.pt")
    assert len(results) == 6
    for key, (loss, grads) in results.items():
        assert loss == pytest.approx(reference_loss, rel=1e-6), key
        assert_same_gradient(grads, reference)


# ------------------------------------------------------------------------------------------ attention and format


def test_per_example_attention_and_the_flex_mask_equal_the_dense_document_mask():
    from lit_adapter.model.gpt import CausalSelfAttention
    from lit_adapter.model.packing import PackedLayout, dense_packed_attention

    torch.manual_seed(0)
    layout = PackedLayout([5, 130, 1, 64])  # one example past a flex block (128), one of a single token
    q, k, v = (torch.randn(1, 2, 200, 8) for _ in range(3))
    reference = dense_packed_attention(q, k, v, layout)
    attn = CausalSelfAttention(tiny(n_head=2, n_query_groups=2, n_embd=16, block_size=256), 0)
    torch.testing.assert_close(layout.attend(attn, q, k, v), reference, rtol=1e-5, atol=1e-6)
    # the CUDA path's block mask, checked here in its forward (FlexAttention has no CPU backward in torch 2.13;
    # uncompiled, as on CPU, it computes the whole score matrix, which only this check may do)
    with pytest.warns(UserWarning, match="without torch.compile"):
        torch.testing.assert_close(layout._flex(q, k, v), reference, rtol=1e-4, atol=1e-5)


def test_the_packed_batch_format():
    batch = packed(examples((3, 5)))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 8)
    assert batch["cu_seqlens"].tolist() == [0, 3, 8]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert batch["labels"][0, 3] == -100  # the first example's last token does not predict the second's first


def test_packed_sampler_is_a_pure_function_of_seed_and_step_and_balances_ranks():
    from lit_adapter.data.packing import PackedStepBatchSampler

    lengths = [int(n) for n in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(3))]
    kw = dict(micro_batch_size=2, accum=2, world_size=2, seed=5, total_steps=6, budget=120)
    ranks = [list(PackedStepBatchSampler(lengths, rank=r, start_step=0, **kw)) for r in (0, 1)]
    resumed = list(PackedStepBatchSampler(lengths, rank=1, start_step=4, **kw))
    assert resumed == ranks[1][8:]  # step 4 on: the same micro-batches, whatever came before
    epoch = [i for r in ranks for mb in r[:8] for i in mb]  # steps 0..3 hold 32 examples, each at most once
    assert len(epoch) == len(set(epoch)) == 32
    for step in range(6):
        tokens = [sum(lengths[i] for mb in r[2 * step : 2 * step + 2] for i in mb) for r in ranks]
        assert max(tokens) - min(tokens) <= max(lengths)  # balanced token budgets
        assert all(sum(lengths[i] for i in mb) <= 120 for r in ranks for mb in r)
    padded = __import__("lit_adapter.data.order", fromlist=["StepBatchSampler"]).StepBatchSampler(
        40, 2, 2, 2, 0, 5, 0, 6)
    assert sorted(i for mb in ranks[0][:2] + ranks[1][:2] for i in mb) == sorted(padded.step_indices(0))


# ----------------------------------------------------------------------------------------------- bad input


def test_a_budget_smaller_than_the_longest_example_names_it():
    from lit_adapter.data.packing import check_budget
    from lit_adapter.errors import UserError

    with pytest.raises(UserError) as err:
        check_budget([12, 40, 7], 32)
    message = str(err.value)
    assert "\n" not in message and "example 1" in message and "40 tokens" in message
    assert "train.micro_batch_tokens=32" in message and "--data.max_seq_length" in message


def test_prepared_data_without_lengths_is_one_line():
    from lit_adapter.data.packing import example_lengths
    from lit_adapter.errors import UserError

    with pytest.raises(UserError, match=r"example 1 has none.*--data.packing false"):
        example_lengths([{"input_ids": torch.arange(3)}, {"text": "no tokens"}])


def test_packing_with_a_method_or_objective_that_cannot_pack_is_one_line(monkeypatch):
    from types import SimpleNamespace

    from lit_adapter.errors import UserError
    from lit_adapter.train.classification import ClassificationObjective
    from lit_adapter.train.dpo import DPOObjective
    from lit_adapter.train.objectives import NEXT_TOKEN
    from lit_adapter.train.run import DataArgs, packs
    from lit_adapter.tuners.registry import get_method

    spec = MethodSpec("lora")
    assert packs(DataArgs(), spec, NEXT_TOKEN) and not packs(DataArgs(packing=False), spec, NEXT_TOKEN)
    monkeypatch.setattr(type(get_method("lora")), "packing_refusal", lambda self, settings: "it mixes the row")
    with pytest.raises(UserError, match=r"^--data.packing true: the lora method does not pack \(it mixes the row\)"):
        packs(DataArgs(packing=True), spec, NEXT_TOKEN)
    assert not packs(DataArgs(), spec, NEXT_TOKEN)  # the default falls back to padding
    monkeypatch.undo()
    for objective in (ClassificationObjective, DPOObjective):
        stub = SimpleNamespace(name=objective.name, packing_refusal=objective.packing_refusal)
        with pytest.raises(UserError, match=f"the {objective.name} objective does not pack"):
            packs(DataArgs(packing=True), spec, stub)
        assert not packs(DataArgs(), spec, stub)


# ------------------------------------------------------------------------------------- the estimate and dry run


def test_the_estimator_takes_a_token_budget_per_micro_batch():
    from lit_adapter.memory.estimate import estimate_memory, format_estimate

    config, spec = tiny(), MethodSpec("lora")
    padded = estimate_memory(config, spec, 4, 32)
    packed_est = estimate_memory(config, spec, 1, 32, micro_batch_tokens=100)  # rounds up to 4 rows of 32
    assert packed_est["peak_bytes"] == padded["peak_bytes"]
    assert "packed micro-batches of 100 tokens (as 4 x 32)" in format_estimate(packed_est)


def test_dry_run_reports_the_padding_share_and_what_packing_saves(tmp_path, capsys, instruction_data):
    from lit_adapter.data.instructions import load_prepared
    from lit_adapter.data.packing import padding_share
    from lit_adapter.train.run import DataArgs, TrainArgs, print_padding_share

    assert padding_share([4, 4, 2, 6], 2) == pytest.approx(1 - 16 / 20)
    print_padding_share(DataArgs(data_dir=instruction_data), TrainArgs(micro_batch_size=4), 128, True, 512)
    out = capsys.readouterr().out
    n = len(load_prepared(instruction_data)[0])
    assert f"data: {n} training examples" in out and "would be padding (estimated" in out
    assert "packing (data.packing, up to 512 tokens per micro-batch)" in out and "saving an estimated" in out
    print_padding_share(DataArgs(data_dir=tmp_path / "none"), TrainArgs(), 128, True, 512)
    assert "no prepared data" in capsys.readouterr().out


def test_the_memory_measurement_runs_a_packed_micro_batch():
    from lit_adapter.memory import Cell, measure_step
    from lit_adapter.memory.estimate import estimate_memory

    cell = Cell(method="lora", model_name="stories260K", seq_len=32, micro_batch_tokens=80, steps=1, timed_steps=0,
                method_settings={"r": 4, "alpha": 8, "dropout": 0.0})
    result = measure_step(cell)
    assert result["status"] == "ok" and result["loss"] > 0
    assert estimate_memory(cell.config(), cell.spec(), 1, 32, micro_batch_tokens=80)["settings"][
        "micro_batch_tokens"] == 80


# ------------------------------------------------------------------------------------------------- whole runs


def _run(out_dir, checkpoint, data_dir, packing, micro_batch_size, steps=1, resume=False):
    from lit_adapter.tracking.loggers import LoggerArgs
    from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, TrainArgs, finetune
    from lit_adapter.tuners.lora import LoRAConfig

    train = TrainArgs(global_batch_size=8, micro_batch_size=micro_batch_size, max_steps=steps, warmup_steps=1,
                      learning_rate=1e-2, seed=7)
    return finetune(MethodSpec("lora", LoRAConfig(r=4, alpha=8, dropout=0.1)), checkpoint_dir=checkpoint,
                    model_name=None, out_dir=out_dir, data=DataArgs(data_dir=data_dir, packing=packing), train=train,
                    eval=EvalArgs(interval=1000, max_batches=2, initial=False), fabric_args=FabricArgs(accelerator="cpu"),
                    logger=LoggerArgs(), resume=resume)


def test_a_runs_first_loss_is_the_same_for_every_split_padded_or_packed(tmp_path, stories_checkpoint,
                                                                        instruction_data):
    """Through the trainer on stories260K and 8 instruction examples: one micro-batch of 8, four of 2, padded or
    packed: the same first-step loss (it was 4.4323 against 4.2877 when micro-batch means were averaged). LoRA's B
    starts at zero, so its dropout, whose masks differ between layouts, does not touch the first step."""
    losses = {}
    for packing in (False, True):
        for micro_batch_size in (8, 2):
            result = _run(tmp_path / f"{packing}-{micro_batch_size}", stories_checkpoint, instruction_data, packing,
                          micro_batch_size)
            losses[packing, micro_batch_size] = result.train_losses[0][1]
    first = losses[False, 8]
    assert all(loss == pytest.approx(first, rel=1e-5) for loss in losses.values()), losses


def test_a_packed_run_resumes_bit_exactly(tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    import json
    import os
    import signal

    from lit_adapter.train import run as training

    whole = _run(tmp_path / "whole", stories_checkpoint, instruction_data, None, 2, steps=4)
    assert json.loads((tmp_path / "whole/hparams.json").read_text())["data"]["packing"] is True  # the default
    original, fired = training.lr_at, []

    def interrupt_after_step_2(step, total, train):  # asked right after optimizer step 2
        if step == 2 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(step, total, train)

    monkeypatch.setattr(training, "lr_at", interrupt_after_step_2)
    with pytest.raises(SystemExit):
        _run(tmp_path / "split", stories_checkpoint, instruction_data, None, 2, steps=4)
    monkeypatch.setattr(training, "lr_at", original)
    resumed = _run(tmp_path / "split", stories_checkpoint, instruction_data, None, 2, steps=4, resume=True)
    assert resumed.train_losses == whole.train_losses  # the same steps 1-4 (dropout and the order continue)
    assert resumed.final_val_loss == whole.final_val_loss


@pytest.mark.parametrize("loss", ["chunked", "chunked_head"])
def test_packed_rows_work_with_every_loss_and_activation_checkpointing(loss):
    model = method_model("lora").train()  # LoRA's dropout is 0.05 by default: set it to nothing
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    row = packed(examples())
    reference, n = forward_loss(model, row["input_ids"], row["labels"], cu_seqlens=row["cu_seqlens"])
    model.gradient_checkpointing = True
    value, m = forward_loss(model, row["input_ids"], row["labels"], loss, cu_seqlens=row["cu_seqlens"])
    value.backward()
    assert m == n and value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
def test_packing_with_learned_positions_gpt2(method):
    config = tiny(norm_class="LayerNorm", mlp_class="GptNeoxMLP", position_embedding="learned", bias=True,
                  gelu_approximate="tanh")
    model = method_model(method, config=config)
    (la, sa, ga), (lp, sp, gp) = one_by_one_and_packed(model, examples())
    torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp, sa, rtol=1e-6, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(gp[name], ga[name], rtol=1e-4, atol=1e-6)
