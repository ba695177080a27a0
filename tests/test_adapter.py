"""LLaMA-Adapter v1: numbers checked against the base model, a naive re-derivation and lit-llama's counts."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lit_adapter.tuners import registry as methods
from lit_adapter.checkpoint import save_state_dict
from lit_adapter.tuners.adapter import AdapterConfig
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import MethodSpec, build_model, mark_trainable, trainable_filter
from lit_adapter.model.gpt import GPT, num_parameters

PROMPT_LENGTH, START_LAYER = 3, 1


def spec_of(method="adapter", prompt_length=PROMPT_LENGTH, start_layer=START_LAYER):
    return MethodSpec(method, AdapterConfig(prompt_length=prompt_length, start_layer=start_layer))


def build(name, method="adapter", prompt_length=PROMPT_LENGTH, start_layer=START_LAYER, std=0.02, **overrides):
    """A random base GPT and a ``method`` model carrying its weights (built by ``methods.build_model`` on a plain
    ``GPT``, its prompts at their initial values); also the load_state_dict report.

    A large ``std`` gives peaked attention, which makes the attention checks sharper.
    """
    config = Config.from_name(name, **overrides)
    base = GPT(config)
    base.init_weights(std)
    model = build_model(spec_of(method, prompt_length, start_layer), config)
    report = model.load_state_dict(base.state_dict(), strict=False)
    return base.eval(), model.eval(), report


def prompt_layers(model):
    """The :class:`AdaptionPrompt` in each adapted layer's attention hook slot."""
    return [block.attn.adapter for block in model.transformer.h if block.attn.adapter is not None]


def set_gates(model, values=None):
    with torch.no_grad():
        for prompt in prompt_layers(model):
            n_head = prompt.gating_factor.shape[1]
            gate = torch.full((n_head,), values) if isinstance(values, float) else torch.linspace(-0.7, 0.9, n_head)
            prompt.gating_factor.copy_(gate.view(1, n_head, 1, 1))


def hf_rope(config, T):
    """cos, sin (1, T, hs) from HF transformers, independent of our rope cache."""
    hf_config = LlamaConfig(
        hidden_size=config.n_embd, num_attention_heads=config.n_head, max_position_embeddings=config.block_size,
        rope_theta=config.rope_base,
    )
    rope = LlamaRotaryEmbedding(hf_config)
    return rope(torch.zeros(1, T, config.n_embd), torch.arange(T)[None])


def naive_adapter_attention(attn, x, project, gate, mask=None):
    """The zero-init attention of the paper, one head at a time with explicit softmaxes.

    ``project(name, x)`` applies the layer's (frozen) projection ``name``; ``mask`` (T, T) says which keys each
    query may see (causal by default). Head h reads key/value group h // (nh / ng).
    """
    cfg = attn.config
    B, T, _ = x.shape
    nh, ng, hs = cfg.n_head, cfg.n_query_groups, cfg.head_size
    q = project("q_proj", x).view(B, T, nh, hs).transpose(1, 2)
    k = project("k_proj", x).view(B, T, ng, hs).transpose(1, 2)
    v = project("v_proj", x).view(B, T, ng, hs).transpose(1, 2)
    cos, sin = hf_rope(cfg, T)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    prompt = attn.adapter.adapter_wte.weight  # (aT, C), no norm, no position
    pk = project("k_proj", prompt).view(-1, ng, hs)
    pv = project("v_proj", prompt).view(-1, ng, hs)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(nh):
        g = h // (nh // ng)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hs)  # (B, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v[:, g]
        prompt_scores = q[:, h] @ pk[:, g].T / math.sqrt(hs)  # (B, T, aT), every token sees every prompt vector
        out = out + gate[h] * (torch.softmax(prompt_scores, dim=-1) @ pv[:, g])
        heads.append(out)
    y = torch.cat(heads, dim=-1)  # (B, T, nh * hs), heads side by side
    return project("o_proj", y)


def plain_projection(attn):
    return lambda name, x: x @ getattr(attn, name).weight.T


class LocalWindowKernel(nn.Module):
    """A stand-in sparse pattern: causal attention restricted to the last ``window`` positions."""

    def __init__(self, window=4):
        super().__init__()
        self.window = window

    def mask(self, q_pos, kv_len):
        k_pos = torch.arange(kv_len)
        return (k_pos[None] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None] < self.window)

    def forward(self, q, k, v, input_pos=None):
        q_pos = torch.arange(q.shape[-2]) if input_pos is None else input_pos
        # k, v arrive grouped (B, ng, S, hs) under GQA, as the model's attention hook passes them
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q_pos, k.shape[-2]),
                                              enable_gqa=k.shape[1] != q.shape[1])


def test_config_is_validated():
    with pytest.raises(UserError, match="prompt_length"):
        AdapterConfig(prompt_length=0)
    with pytest.raises(UserError, match="start_layer"):
        AdapterConfig(start_layer=-1)
    with pytest.raises(UserError, match="start_layer=3.*n_layer=2"):
        build_model(MethodSpec("adapter", AdapterConfig(start_layer=3)), Config.from_name("tiny"))
    with pytest.raises(UserError, match="start_layer=2"):  # would leave nothing to train
        MethodSpec("adapter", AdapterConfig(start_layer=2)).validate(Config.from_name("tiny"))


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_zero_gates_leave_the_base_model_unchanged(name):
    base, model, report = build(name, start_layer=0)
    assert sorted(report.missing_keys) == [
        f"transformer.h.{i}.attn.adapter.{p}" for i in range(2) for p in ("adapter_wte.weight", "gating_factor")
    ]
    assert report.unexpected_keys == []
    idx = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


def test_only_prompts_and_gates_get_gradients():
    _, model, _ = build("tiny-gqa")
    mark_trainable(model, spec_of())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"transformer.h.1.attn.adapter.{p}" for p in ("adapter_wte.weight", "gating_factor")]
    idx = torch.randint(0, 512, (2, 9))

    def grads():
        model.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    g = grads()
    assert all(g[n] is None for n in g if n not in trainable)
    # zero gate: the prompt's gradient is exactly zero (it is multiplied by the gate), the gate's is not
    assert torch.count_nonzero(g[trainable[0]]) == 0
    assert g[trainable[1]].abs().min() > 0
    set_gates(model, 0.5)
    g = grads()
    assert all(g[n] is None for n in g if n not in trainable)
    assert g[trainable[0]].abs().sum() > 0 and g[trainable[1]].abs().min() > 0


def test_7b_trainable_count_equals_lit_llama():
    """lit-llama (``lit_llama/adapter.py``): prompt ``nn.Embedding(10, 4096)`` and gate ``zeros(1, n_head, 1, 1)``
    in layers 2..31 of LLaMA 7B: 30 x (10 x 4096 + 32) = 1,229,760 trainable parameters."""
    with torch.device("meta"):
        model = build_model(MethodSpec("adapter", AdapterConfig()), Config.from_name("7B"))
    mark_trainable(model, MethodSpec("adapter", AdapterConfig()))
    assert num_parameters(model, requires_grad=True) == 30 * (10 * 4096 + 32) == 1_229_760
    assert num_parameters(model) == 6_738_415_616 + 1_229_760  # LLaMA 7B itself plus the adapter


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_attention_matches_naive_reference(name):
    _, model, _ = build(name, std=0.3)
    set_gates(model)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 7, attn.config.n_embd)
    cos, sin = model.rope_cache(x.device)
    gate = attn.adapter.gating_factor.view(-1)
    with torch.no_grad():
        ours = attn(x, cos[:7], sin[:7])
        ref = naive_adapter_attention(attn, x, plain_projection(attn), gate)
        dense_only = naive_adapter_attention(attn, x, plain_projection(attn), torch.zeros_like(gate))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # float32 round-off
    assert (ours - dense_only).abs().max() > 0.1 * ours.abs().max()  # the prompt really contributes


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_kv_cache_decoding_matches_full_forward(name):
    _, model, _ = build(name, start_layer=0)
    set_gates(model)
    idx = torch.randint(0, 512, (2, 12))

    def decode():
        model.set_kv_cache(batch_size=2)
        steps = [model(idx[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 12):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t])))
        return torch.cat(steps, dim=1)

    with torch.no_grad():
        incremental = decode()
        torch.testing.assert_close(incremental, model(idx), rtol=0, atol=2e-6)
        # the prompt keys/values cached while decoding must follow an in-place change of the prompt
        incremental = decode()
        model.transformer.h[1].attn.adapter.adapter_wte.weight.mul_(2.0)
        incremental = decode()
        torch.testing.assert_close(incremental, model(idx), rtol=0, atol=2e-6)
    model.clear_kv_cache()


def test_composes_with_a_sparse_attention_kernel():
    base, model, _ = build("tiny-gqa", std=0.3)
    kernel = LocalWindowKernel(window=4)
    for m in (base, model):
        for block in m.transformer.h:
            block.attn.attention_kernel = kernel
    idx = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # zero gates: exactly the sparse base
    set_gates(model)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 10, attn.config.n_embd)
    cos, sin = model.rope_cache(x.device)
    mask = kernel.mask(torch.arange(10), 10)
    with torch.no_grad():
        ours = attn(x, cos[:10], sin[:10])
        gate = attn.adapter.gating_factor.view(-1)
        ref = naive_adapter_attention(attn, x, plain_projection(attn), gate, mask)
        dense = naive_adapter_attention(attn, x, plain_projection(attn), gate)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert (ours - dense).abs().max() > 0.1 * ours.abs().max()  # the kernel's pattern was used


def checkpoint_dir(tmp_path, base):
    """A converted checkpoint folder of ``base`` (weights and config: no tokenizer is needed to load a method)."""
    out = tmp_path / "base"
    out.mkdir(exist_ok=True)
    save_state_dict(base.state_dict(), out / "lit_model.safetensors")
    base.config.save(out / "model_config.json")
    return out


def trained_tensors(model, spec):
    keep = trainable_filter(spec)
    return {n: p.detach().clone() for n, p in model.named_parameters() if keep(n, p)}


def test_adapter_round_trip_through_final(tmp_path):
    """``methods.save_adapter`` writes only the prompts and gates; ``load_finetuned`` rebuilds the same model."""
    base, model, _ = build("tiny")
    set_gates(model)
    spec = spec_of()
    base_dir = checkpoint_dir(tmp_path, base)
    methods.save_adapter(model, spec, base.config, base_dir, tmp_path / "final")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "final" / methods.ADAPTER_FILE))
    assert sorted(sd) == [f"transformer.h.1.attn.adapter.{p}" for p in ("adapter_wte.weight", "gating_factor")]
    assert sum(t.numel() for t in sd.values()) == PROMPT_LENGTH * 32 + 4

    _, fresh, spec_read = methods.load_finetuned(base_dir, tmp_path / "final", torch.device("cpu"), torch.float32)
    assert spec_read.method == "adapter" and spec_read.settings == spec.settings
    idx = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


def test_adapter_tensors_for_another_config_are_a_user_error():
    spec = spec_of()
    _, model, _ = build("tiny")
    sd = trained_tensors(model, spec)
    _, longer, _ = build("tiny", prompt_length=PROMPT_LENGTH + 1)
    shape = r"transformer.h.1.attn.adapter.adapter_wte.weight: checkpoint \(3, 32\) vs model \(4, 32\)"
    with pytest.raises(UserError, match=shape):
        methods.load_trained_tensors(longer, sd, spec_of(prompt_length=PROMPT_LENGTH + 1), "final")
    _, wider, _ = build("tiny", n_embd=64)
    with pytest.raises(UserError, match=r"adapter_wte.weight: checkpoint \(3, 32\) vs model \(3, 64\)"):
        methods.load_trained_tensors(wider, sd, spec, "final")
    _, earlier, _ = build("tiny", start_layer=0)
    missing = (r"2 missing keys: transformer.h.0.attn.adapter.(gating_factor|adapter_wte.weight), "
               r"transformer.h.0.attn.adapter.(gating_factor|adapter_wte.weight)$")
    with pytest.raises(UserError, match=missing):
        methods.load_trained_tensors(earlier, sd, spec_of(start_layer=0), "final")
    with pytest.raises(UserError, match=r"1 unexpected keys: transformer.h.1.attn.adapter.lora_A"):
        methods.load_trained_tensors(model, {**sd, "transformer.h.1.attn.adapter.lora_A": torch.zeros(1)}, spec,
                                     "final")


def test_meta_device_model_loads_base_weights_and_materializes_the_adapter(tmp_path):
    config = Config.from_name("tiny")
    base = GPT(config)
    base.init_weights()
    spec = spec_of(prompt_length=64, start_layer=0)
    model = methods.prepare_model(spec, config, checkpoint_dir(tmp_path, base), torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"transformer.h.{i}.attn.adapter.{p}" for i in range(2) for p in ("adapter_wte.weight", "gating_factor")]
    prompt = model.transformer.h[0].attn.adapter.adapter_wte.weight
    assert prompt.device.type == "cpu" and prompt.dtype == torch.float32
    assert 0.9 < prompt.std().item() < 1.1  # nn.Embedding's N(0, 1), as lit-llama
    assert torch.count_nonzero(model.transformer.h[1].attn.adapter.gating_factor) == 0
    idx = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


def quantize_attention_nf4(model):
    """Replaces q/k/v/o of every layer by bitsandbytes NF4 layers; returns (owner, name, dequantized weight)."""
    import bitsandbytes as bnb

    replaced = []
    for block in model.transformer.h:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            owner, attr = block.attn, name
            if hasattr(getattr(owner, attr), "linear"):  # an adapter v2 wrapper: quantize what it holds
                owner, attr = getattr(owner, attr), "linear"
            linear = getattr(owner, attr)
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
            q = q.to("cpu")  # quantizes
            setattr(owner, attr, q)
            replaced.append((owner, attr, bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)))
    return replaced


def with_plain_linears(model, dequantized):
    """Copies of the quantized layers as ordinary nn.Linear holding the dequantized weights (the reference)."""
    for owner, name, weight in dequantized:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
        setattr(owner, name, linear)


def test_quantized_base(tmp_path):
    _, model, _ = build("tiny-gqa", start_layer=0)
    set_gates(model)
    mark_trainable(model, spec_of(start_layer=0))
    idx = torch.randint(0, 512, (2, 8))
    dequantized = quantize_attention_nf4(model)
    assert type(model.transformer.h[0].attn.k_proj).__name__ == "Linear4bit"

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        logits.square().mean().backward()
        return logits.detach(), model.transformer.h[0].attn.adapter.adapter_wte.weight.grad.clone()

    quantized_logits, quantized_grad = run()
    with_plain_linears(model, dequantized)
    reference_logits, reference_grad = run()
    torch.testing.assert_close(quantized_logits, reference_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(quantized_grad, reference_grad, rtol=1e-4, atol=1e-7)
    assert quantized_grad.abs().sum() > 0
