"""The MFU arithmetic (lit_adapter.model.flops) against FLOP counts of the tiny configs worked out by hand."""

import torch

from lit_adapter.model import flops
from lit_adapter.model.config import Config


def test_matmul_params_tiny_by_hand():
    # tiny: n_embd 32, 4 heads of 8, intermediate 88, vocabulary 512, 2 layers
    # per layer q, k, v, o: 4 * 32 * 32 = 4096; gate, up, down: 3 * 32 * 88 = 8448; head 32 * 512 = 16384
    assert flops.matmul_params(Config.from_name("tiny")) == 2 * (4096 + 8448) + 16384 == 41472
    # tiny-gqa: 2 key/value heads, so k and v are 32 x 16
    assert flops.matmul_params(Config.from_name("tiny-gqa")) == 2 * (2 * 1024 + 2 * 512 + 8448) + 16384


def test_step_flops_tiny_by_hand():
    c = Config.from_name("tiny")
    n, layer, head = 41472, 12544, 16384
    attn = 2 * 2 * 16 * 32  # per token and layer forward at T = 16: Q K^T and A V, not halved
    assert flops.attention_flops_per_token(c, 16) == attn == 2048
    frozen = flops.step_flops(c, seq_len=16, batch_size=3)
    assert frozen.tokens == 48
    assert frozen.forward == 48 * (2 * (2 * layer + attn) + 2 * head) == 48 * 87040
    assert frozen.backward == 48 * (2 * (2 * layer + 2 * attn) + 2 * head) == 48 * 91136
    assert frozen.per_token == 4 * n + 12 * 2 * 16 * 32 == 178176  # 4N + 3 x attention forward, every layer
    full = flops.step_flops(c, seq_len=16, batch_size=3, full=True)
    assert full.per_token == 6 * n + 12 * 2 * 16 * 32 == 261120
    # LLaMA-Adapter v1 from layer 1: layer 0 runs forward only
    v1 = flops.step_flops(c, seq_len=16, batch_size=1, backward_from=1)
    assert v1.total == 16 * (87040 + (2 * layer + 2 * attn) + 2 * head) == 16 * 148992


def test_first_backward_layer():
    from lit_adapter.memory import Cell, build_random_model

    # LLaMA-Adapter v1 trains prompts from start_layer = 2 on; LoRA and v2 (its norms) train in every layer
    for method, expected in (("lora", 0), ("adapter", 2), ("adapter_v2", 0)):
        cell = Cell(method=method, model_name="stories260K", seq_len=16, micro_batch_size=1, precision="32-true",
                    device="cpu")
        assert flops.first_backward_layer(build_random_model(cell, torch.device("cpu"))) == expected


def test_measure_matmul_rate_reports_every_shape():
    rate = flops.measure_matmul_rate(Config.from_name("tiny"), rows=16, min_time_s=0.001)
    # distinct (in, out) of tiny: 32x32, 32x88, 88x32, 32x512, and the backward's 512x32
    assert set(rate.by_shape) == {"16x32@32x32", "16x32@32x88", "16x88@88x32", "16x32@32x512", "16x512@512x32"}
    assert 0 < rate.model_weighted <= rate.peak
