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
