"""LLaMA-Adapter V2: numbers checked against HF transformers, a naive re-derivation and lit-llama's counts."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lit_adapter.tuners import registry as methods
from lit_adapter.checkpoint import save_state_dict, to_model_keys
from lit_adapter.tuners.adapter import AdapterConfig
from lit_adapter.tuners.adapter_v2 import AdapterV2Linear
from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_name
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import MethodSpec, build_model, mark_trainable
from lit_adapter.model.gpt import GPT, num_parameters
from test_adapter import (
    LocalWindowKernel, build, checkpoint_dir, naive_adapter_attention, prompt_layers, quantize_attention_nf4,
    set_gates, spec_of, trained_tensors, with_plain_linears,
)

LINEARS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def build_v2(name, **kwargs):
    return build(name, method="adapter_v2", **kwargs)


def randomize_v2(model, gates=True):
    """Random v2 biases, scales and norm weights (and per-head gates), so every v2 parameter matters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdapterV2Linear):
                module.adapter_bias.normal_(0, 0.1)
                module.adapter_scale.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if "norm_" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5)
    if gates:
        set_gates(model)


def v2_projection(attn):
    """scale * (x W^T + bias), written out from the paper for the naive reference."""
    def project(name, x):
        m = getattr(attn, name)
        return (x @ m.linear.weight.T + m.adapter_bias) * m.adapter_scale
    return project


def expected_trainable(n_layer, prompt_layers):
    names = {"transformer.ln_f.weight", "lm_head.adapter_bias", "lm_head.adapter_scale"}
    for i in range(n_layer):
        names |= {f"transformer.h.{i}.norm_1.weight", f"transformer.h.{i}.norm_2.weight"}
        names |= {f"transformer.h.{i}.{lin}.adapter_{p}" for lin in LINEARS for p in ("bias", "scale")}
    for i in prompt_layers:
        names |= {f"transformer.h.{i}.attn.adapter.adapter_wte.weight", f"transformer.h.{i}.attn.adapter.gating_factor"}
    return names


def test_linear_wrapper_is_scale_times_linear_plus_bias():
    linear = nn.Linear(6, 5, bias=True)
    wrapped = AdapterV2Linear(linear)
    assert (wrapped.in_features, wrapped.out_features) == (6, 5) and wrapped.weight is linear.weight
    x = torch.randn(3, 6)
    assert torch.equal(wrapped(x), linear(x))  # bias 0, scale 1
    with torch.no_grad():
        wrapped.adapter_bias.normal_()
        wrapped.adapter_scale.normal_()
    expected = wrapped.adapter_scale * (x @ linear.weight.T + linear.bias + wrapped.adapter_bias)
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, tie", [("tiny", False), ("tiny-gqa", False), ("tiny", True)])
def test_init_leaves_the_base_model_unchanged_and_base_checkpoints_load(name, tie):
    base, model, report = build_v2(name, tie_embeddings=tie)
    assert report.unexpected_keys == []
    assert sorted(report.missing_keys) == sorted(
        k for k in expected_trainable(2, [1]) if "adapter_" in k or "gating_factor" in k
    )
    if tie:
        assert model.lm_head.linear.weight is model.transformer.wte.weight
    # every base tensor went to the wrapped linear
    assert torch.equal(model.transformer.h[0].attn.q_proj.linear.weight, base.transformer.h[0].attn.q_proj.weight)
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


def test_only_v2_parameters_get_gradients():
    _, model, _ = build_v2("tiny-gqa")
    mark_trainable(model, spec_of("adapter_v2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(2, [1])
    set_gates(model, 0.5)
    idx = torch.randint(0, 512, (2, 9))
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_7b_trainable_count_equals_lit_llama():
    """lit-llama's ``finetune/adapter_v2.py`` builds ``lit_llama.adapter.LLaMA`` (7B: 32 layers, n_embd 4096,
    32 heads, MLP width 11008, vocab 32000, adapter_prompt_length 10, adapter_start_layer 2), adds
    ``adapter_bias`` and ``adapter_scale`` (out_features each) to every ``nn.Linear`` and trains the names with
    "adapter_wte", "gating_factor", "adapter_bias", "adapter_scale", "rms_1", "rms_2", "ln_f":

    * prompts and gates (v1): 30 x (10 x 4096 + 32)                                     = 1,229,760
    * bias + scale per layer: 2 x (c_attn 3 x 4096 + c_proj 4096 + c_fc1 11008 + c_fc2 11008
      + mlp.c_proj 4096) = 2 x 42,496 = 84,992; x 32 layers                              = 2,719,744
    * bias + scale of lm_head: 2 x 32,000                                                =    64,000
    * RMSNorm weights: 32 x 2 x 4096 + 4096 (ln_f)                                       =   266,240
    * total                                                                              = 4,279,744

    Our q/k/v are separate layers but their outputs add up to c_attn's 3 x 4096, so the count is the same.
    """
    spec = MethodSpec("adapter_v2", AdapterConfig())
    with torch.device("meta"):
        model = build_model(spec, Config.from_name("7B"))
    mark_trainable(model, spec)
    assert 30 * (10 * 4096 + 32) + 32 * 2 * (3 * 4096 + 4096 + 2 * 11008 + 4096) + 2 * 32000 + 65 * 4096 == 4_279_744
    assert num_parameters(model, requires_grad=True) == 4_279_744


@pytest.mark.parametrize("tie", [False, True])
def test_matches_hf_llama_with_folded_biases_and_scales(tie):
    """With zero gates, v2 is a LLaMA whose linears have biases: scale * (W x + b) = (scale W) x + scale b.
    HF's ``LlamaForCausalLM`` with ``attention_bias``/``mlp_bias`` (and a biased lm_head) is the oracle."""
    config = Config.from_name("tiny-gqa", tie_embeddings=tie)
    _, model, _ = build_v2("tiny-gqa", tie_embeddings=tie)
    randomize_v2(model, gates=False)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False, attn_implementation="eager",
    ))
    hf.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)
    folded = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterV2Linear):
            hf_name = lit_to_hf_name(name + ".weight")
            folded[hf_name] = module.adapter_scale[:, None] * module.linear.weight
            folded[hf_name[: -len("weight")] + "bias"] = module.adapter_scale * module.adapter_bias
    for name, t in model.state_dict().items():
        if "norm_" in name or name in ("transformer.wte.weight", "transformer.ln_f.weight"):
            folded[lit_to_hf_name(name)] = t
    hf.load_state_dict(folded, strict=True)
    idx = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        ours, theirs = model(idx), hf.eval()(idx).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_attention_matches_naive_reference(name):
    _, model, _ = build_v2(name, std=0.3)
    randomize_v2(model)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 7, attn.config.n_embd)
    cos, sin = model.rope_cache(x.device)
    with torch.no_grad():
        ours = attn(x, cos[:7], sin[:7])
        # the prompt's keys and values go through the adapted k_proj / v_proj too
        ref = naive_adapter_attention(attn, x, v2_projection(attn), attn.adapter.gating_factor.view(-1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_sparse_kernel_and_kv_cache():
    _, model, _ = build_v2("tiny-gqa", start_layer=0)
    randomize_v2(model)
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        for kernel in (None, LocalWindowKernel(window=4)):
            for block in model.transformer.h:
                block.attn.attention_kernel = kernel
            full = model(idx)
            model.set_kv_cache(batch_size=2)
            steps = [model(idx[:, :5], input_pos=torch.arange(5))]
            steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(5, 12)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-6)
    attn = model.transformer.h[1].attn
    x = torch.randn(1, 9, attn.config.n_embd)
    cos, sin = model.rope_cache(x.device)
    with torch.no_grad():
        ref = naive_adapter_attention(attn, x, v2_projection(attn), attn.adapter.gating_factor.view(-1),
                                      LocalWindowKernel(4).mask(torch.arange(9), 9))
        torch.testing.assert_close(attn(x, cos[:9], sin[:9]), ref, rtol=1e-5, atol=1e-6)


def test_final_round_trip_and_mismatch(tmp_path):
    """``methods.save_adapter`` writes exactly v2's trained tensors; ``load_finetuned`` rebuilds the same model;
    tensors of another model are refused with one line naming the shapes."""
    base, model, _ = build_v2("tiny")
    randomize_v2(model)
    spec = spec_of("adapter_v2")
    base_dir = checkpoint_dir(tmp_path, base)
    methods.save_adapter(model, spec, base.config, base_dir, tmp_path / "final")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "final" / methods.ADAPTER_FILE))
    assert set(sd) == expected_trainable(2, [1])
    # 2 x (4 x 32 + 2 x 88 + 32) per layer, 2 x 512 for the head, 2 x 2 x 32 + 32 norm weights, prompt 3 x 32 + 4
    assert sum(t.numel() for t in sd.values()) == 2 * 2 * (4 * 32 + 2 * 88 + 32) + 2 * 512 + 5 * 32 + 3 * 32 + 4
    _, fresh, _ = methods.load_finetuned(base_dir, tmp_path / "final", torch.device("cpu"), torch.float32)
    idx = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))
    _, wider, _ = build_v2("tiny", n_embd=64)
    with pytest.raises(UserError, match=r"adapter_v2 weights in final do not fit.*checkpoint \(32,\) vs model \(64,\)"):
        methods.load_trained_tensors(wider, trained_tensors(model, spec), spec, "final")


def test_meta_device_build_with_tied_head(tmp_path):
    config = Config.from_name("tiny", tie_embeddings=True)
    base = GPT(config)
    base.init_weights()
    spec = spec_of("adapter_v2", prompt_length=3, start_layer=1)
    with torch.device("meta"):
        model = build_model(spec, config)
    base_sd = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}  # tied checkpoints may omit it
    renamed = to_model_keys(base_sd, set(model.state_dict(keep_vars=True)))  # the one base-key renamer
    assert "transformer.h.0.attn.q_proj.linear.weight" in renamed and "lm_head.linear.weight" not in renamed
    assert set(renamed) | {"lm_head.linear.weight"} == {k for k in model.state_dict() if not (
        "adapter_" in k or "gating_factor" in k)}
    folder = tmp_path / "base"
    folder.mkdir()
    save_state_dict(base_sd, folder / "lit_model.safetensors")
    config.save(folder / "model_config.json")
    model = methods.prepare_model(spec, config, folder, torch.device("cpu"), torch.float32)
    assert model.lm_head.linear.weight is model.transformer.wte.weight
    assert not any(p.is_meta for p in model.parameters())
    assert len([m for m in model.modules() if isinstance(m, AdapterV2Linear)]) == 2 * 7 + 1
    idx = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


def test_quantized_base():
    _, model, _ = build_v2("tiny-gqa", start_layer=0)
    randomize_v2(model)
    mark_trainable(model, spec_of("adapter_v2", start_layer=0))
    dequantized = quantize_attention_nf4(model)
    assert type(model.transformer.h[0].attn.k_proj.linear).__name__ == "Linear4bit"
    idx = torch.randint(0, 512, (2, 8))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(idx)
        logits.square().mean().backward()
        bias_grad = model.transformer.h[0].attn.k_proj.adapter_bias.grad.clone()
        return logits.detach(), bias_grad, prompt_layers(model)[0].adapter_wte.weight.grad.clone()

    quantized = run()
    with_plain_linears(model, dequantized)
    reference = run()
    for q, r in zip(quantized, reference):
        torch.testing.assert_close(q, r, rtol=1e-4, atol=1e-6)
    assert quantized[1].abs().sum() > 0 and quantized[2].abs().sum() > 0


def _unfused(x, weight, bias, scale):
    return scale * (x @ weight.T + bias)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_fused_epilogue_equals_the_unfused_form_forward_and_gradients(dtype, tol):
    """lit_adapter.tuners.scale_bias against ``scale * (x W^T + b)`` through autograd, every input trained."""
    from lit_adapter.tuners.scale_bias import scale_bias_linear

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 7, 6, generator=g, dtype=dtype), torch.randn(5, 6, generator=g, dtype=dtype),
               torch.randn(5, generator=g, dtype=dtype), torch.rand(5, generator=g, dtype=dtype) + 0.5]
    grad_out = torch.randn(3, 7, 5, generator=g, dtype=dtype)
    results = []
    for fn in (scale_bias_linear, _unfused):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for fused, unfused in zip(*results):
        torch.testing.assert_close(fused, unfused, rtol=tol, atol=tol)


def test_fused_epilogue_only_where_it_applies_and_a_second_backward_raises():
    from lit_adapter.tuners.scale_bias import fusable

    plain, biased = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=True)
    x = torch.randn(2, 6)
    wrapped = AdapterV2Linear(plain)
    assert wrapped.fused_epilogue  # on by default (see AdapterV2Linear.fused_epilogue)
    assert fusable(plain, x, wrapped.adapter_bias, wrapped.adapter_scale)
    assert not fusable(biased, x, wrapped.adapter_bias, wrapped.adapter_scale)  # its own bias: unfused path
    assert not fusable(plain, x.double(), wrapped.adapter_bias, wrapped.adapter_scale)  # mixed dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable(plain, x, wrapped.adapter_bias, wrapped.adapter_scale)
    with torch.no_grad():
        wrapped.adapter_bias.normal_()
        wrapped.adapter_scale.uniform_(0.5, 1.5)
    out = wrapped(x.requires_grad_(True))
    torch.testing.assert_close(out, _unfused(x, plain.weight, wrapped.adapter_bias, wrapped.adapter_scale),
                               rtol=1e-6, atol=1e-6)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the saved z was consumed by the first backward
        out.sum().backward()


@pytest.mark.parametrize("precision, quantize", [("32-true", None), ("bf16-true", "bnb.int8")])
def test_fused_epilogue_is_the_default_and_the_estimator_describes_either_path(monkeypatch, precision, quantize):
    """The model's loss and gradients are the unfused form's, and for each setting of the flag the memory terms
    give autograd's saved bytes exactly (a quantized base runs its block linears unfused, the head fused)."""
    from lit_adapter.memory import Cell, build_random_model, measure_saved_activations, saved_activations

    assert AdapterV2Linear.fused_epilogue is True
    small = dict(name="small", block_size=64, vocab_size=300, n_layer=3, n_head=4, n_embd=32, intermediate_size=64,
                 n_query_groups=2)
    cell = Cell(method="adapter_v2", model_name=None, config_overrides=small, precision=precision,
                quantize=quantize, seq_len=24, micro_batch_size=2)
    batch = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(AdapterV2Linear, "fused_epilogue", fused)
        torch.manual_seed(0)
        model = build_random_model(cell, torch.device("cpu")).train()
        measured = measure_saved_activations(model, batch)
        predicted = saved_activations(cell.config(), cell.spec(), 2, 24, precision)
        assert (measured["layers"], measured["head"]) == (predicted["layers"], predicted["head"])
        model.zero_grad()
        logits = model(batch)
        F.cross_entropy(logits.float().flatten(0, 1), batch.flatten()).backward()
        results[fused] = (logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None},
                          predicted)
    tol = 1e-5 if precision == "32-true" else 2e-2
    torch.testing.assert_close(results[True][0], results[False][0], rtol=tol, atol=tol)
    assert results[True][1].keys() == results[False][1].keys() and results[True][1]
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], rtol=tol, atol=tol, msg=name)
    # the fused path also keeps each fused linear's input: more saved bytes, on the head at least
    assert results[True][2]["head"] > results[False][2]["head"]
