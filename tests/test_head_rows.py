"""The head and the loss run only on the rows that have a target (``forward_loss(..., rows=target_rows(labels))``):
the same loss, count and gradients as the full logits, for every loss kind, padded and packed, with methods that
wrap the head (Adapter v2's bias and scale) or put virtual tokens in front; the rows are made on the host where
the batch is collated."""

import pytest
import torch

from lit_adapter.train.losses import forward_loss, target_rows
from lit_adapter.train.objectives import Objective
from test_packing import examples, method_model

LOSS_KINDS = ["cross_entropy", "chunked", "chunked_head"]


def _loss_and_grads(model, batch, loss, rows):
    value, n = forward_loss(model, batch["input_ids"], batch["labels"], loss, cu_seqlens=batch.get("cu_seqlens"),
                            lengths=batch.get("lengths"), rows=batch["target_rows"] if rows else None)
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach(), int(n), grads


@pytest.mark.parametrize("loss", LOSS_KINDS)
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", ["lora", "adapter_v2", "prefix_tuning"])
def test_the_head_on_target_rows_equals_the_full_logits(method, packing, loss):
    model = method_model(method)  # float32, every added tensor non-zero
    batch = examples((7, 16, 3, 11))
    objective = Objective()
    collated = objective.collate_packed(batch) if packing else objective.collate(batch, pad_id=0)
    full = _loss_and_grads(model, collated, loss, rows=False)
    only = _loss_and_grads(model, collated, loss, rows=True)
    assert only[1] == full[1] == int(objective.count(collated))  # step-level normalisation's count is unchanged
    torch.testing.assert_close(only[0], full[0], rtol=1e-6, atol=1e-6)
    assert only[2].keys() == full[2].keys() and full[2]
    for name in full[2]:
        torch.testing.assert_close(only[2][name], full[2][name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_target_rows_are_the_positions_with_a_next_token_target():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100]])
    # position t predicts labels[t + 1]: row 0 predicts 5 and 6 from positions 1, 2; row 1 predicts 7, 8 from 0, 1
    assert target_rows(labels).tolist() == [1, 2, 5, 6]
    collated = Objective().collate(examples((4, 6)), pad_id=0)
    assert collated["target_rows"].device.type == "cpu"
    assert len(collated["target_rows"]) == int(Objective().count(collated))


def test_the_head_sees_only_the_target_rows(monkeypatch):
    """The head's input really is the target rows: with a masked prompt it is fewer rows than positions."""
    model = method_model("adapter_v2")
    collated = Objective().collate(examples((12, 9)), pad_id=0)
    seen = []
    original = type(model).output_logits
    monkeypatch.setattr(type(model), "output_logits", lambda self, x: seen.append(x.shape) or original(self, x))
    forward_loss(model, collated["input_ids"], collated["labels"], rows=collated["target_rows"])
    assert seen == [(len(collated["target_rows"]), model.config.n_embd)]
    assert len(collated["target_rows"]) < collated["input_ids"].numel()
