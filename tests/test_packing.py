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
