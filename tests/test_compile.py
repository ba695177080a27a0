"""``--train.compile true`` (runtime.compile_blocks): the compiled blocks train like the eager ones.

torch.compile's first forward and backward take tens of seconds on a small CPU (about 60 s on the shared 2-core
machine): the test is marked ``slow`` (pytest.ini; CI runs it, ``-m "not slow"`` skips it).
"""

import pytest
import torch

from lit_adapter.train.losses import forward_loss
from lit_adapter.memory import Cell, build_random_model
from lit_adapter.runtime import compile_blocks


def _model(method):
    torch.manual_seed(0)
    cell = Cell(method=method, model_name="stories260K", seq_len=32, micro_batch_size=2, precision="32-true",
                device="cpu")
    model = build_random_model(cell, torch.device("cpu"))
    with torch.no_grad():  # make v2's bias and scale matter (they start at 0 and 1)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    eager, compiled = _model("adapter_v2"), _model("adapter_v2")
    assert compile_blocks(compiled, dynamic=False) == compiled.config.n_layer
    batch = torch.randint(0, compiled.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second step runs the cached graph
        losses = []
        for model in (eager, compiled):
            loss = forward_loss(model, batch, batch)[0]
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
                p.grad = q.grad = None
