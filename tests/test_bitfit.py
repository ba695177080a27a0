"""BitFit against HF LlamaForCausalLM with attention_bias/mlp_bias and a naive biased-linear model (float32), the
exact parameter counts, tied and quantized bases, and the trainable share of seed 004's exercise."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse import CLI
from test_lora import _dequantized, _quantized, base_model, quantizable_base, rel_err, tokens
from test_model import hf_reference
from test_scripts import load_setup

from lit_adapter.checkpoint import save_state_dict
from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_name
from lit_adapter.tuners.registry import MethodSpec, build_model, format_share, mark_trainable, prepare_model
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.bitfit import BitFitConfig, BitFitLinear
from lit_adapter.tuners.wrapping import wrapped_layers


def bitfit_model(base: GPT, cfg: BitFitConfig, perturb: bool = True) -> GPT:
    """A BitFit copy of ``base`` (``methods.build_model`` carrying its weights); with ``perturb`` the biases are
    non-zero, as after training."""
    model = build_model(MethodSpec("bitfit", cfg), base.config)
    model.load_state_dict(base.state_dict(), strict=False)
    mark_trainable(model, MethodSpec("bitfit", cfg))
    if perturb:
        with torch.no_grad():
            for layer in wrapped_layers(model, BitFitLinear).values():
                layer.bitfit_bias.normal_(0, 0.2)
    return model


def biases(model: GPT):
    """``{qualified linear name: bias}`` of a BitFit model."""
    return {name: layer.bitfit_bias for name, layer in wrapped_layers(model, BitFitLinear).items()}


def expected_count(config: Config, head: bool = False) -> int:
    hs = config.head_size
    per_layer = (config.n_head * hs + 2 * config.n_query_groups * hs + config.n_embd
                 + 2 * config.intermediate_size + config.n_embd)
    return config.n_layer * per_layer + (config.padded_vocab_size if head else 0)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("head, tie", [(False, False), (True, False), (True, True)])
def test_identity_at_init_and_exact_count(name, head, tie):
    base = base_model(name, tie_embeddings=tie)
    model = bitfit_model(base, BitFitConfig(head=head), perturb=False)
    idx = tokens(base.config)
    assert torch.equal(model(idx), base(idx))  # zero biases: bit for bit
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_count(base.config, head)
    if tie:  # the wrapped head still holds the embedding's Parameter
        assert model.lm_head.linear.weight is model.transformer.wte.weight and model.lm_head.weight_is_shared


def _hf_biased(base: GPT, model: GPT):
    """HF's LLaMA with biases on q/k/v/o and gate/up/down, holding our base weights and our BitFit biases."""
    from transformers import LlamaForCausalLM

    hf_config = hf_reference(base.config, base).config
    hf_config.attention_bias = hf_config.mlp_bias = True
    hf = LlamaForCausalLM(hf_config)
    state = {lit_to_hf_name(k): v for k, v in base.state_dict().items()}
    for name, bias in biases(model).items():
        state[lit_to_hf_name(name + ".weight")[: -len("weight")] + "bias"] = bias.detach()
    hf.load_state_dict(state, strict=True)  # every HF bias is one of ours
    return hf


# With the default N(0, 0.02) weights the tiny models' attention is almost uniform and the q/k bias gradients
# (~1e-7) sit at float32's rounding of the activations: 1-3e-5 apart (relative to their largest value) over 4
# seeds. Weights of std 0.1 give the attention some shape; there they agree to 0.5-1.6e-6.
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_matches_hf_llama_with_attention_and_mlp_biases(name):
    base = GPT(Config.from_name(name))
    base.init_weights(std=0.1)
    model = bitfit_model(base, BitFitConfig())
    hf = _hf_biased(base, model)
    hf.requires_grad_(False)
    hf_biases = {n: p.requires_grad_() for n, p in hf.named_parameters() if n.endswith(".bias")}
    assert sum(p.numel() for p in hf_biases.values()) == sum(p.numel() for p in model.parameters()
                                                            if p.requires_grad)
    idx = tokens(base.config)
    targets = torch.randint(0, base.config.vocab_size, idx.shape)
    ours, theirs = model(idx), hf(input_ids=idx).logits
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, base(idx)) > 1e-2  # the biases are not negligible
    F.cross_entropy(ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets.flatten()).backward()
    for layer_name, bias in biases(model).items():
        hf_name = lit_to_hf_name(layer_name + ".weight")[: -len("weight")] + "bias"
        assert rel_err(bias.grad, hf_biases[hf_name].grad) < 1e-5, layer_name


def test_matches_naive_linears_with_bias_including_the_head():
    """The same model written the plain way: every nn.Linear of our GPT given a ``bias`` (F.linear adds it)."""
    base = base_model("tiny-gqa")
    model = bitfit_model(base, BitFitConfig(head=True))
    naive = copy.deepcopy(base)
    for name, bias in biases(model).items():
        naive.get_submodule(name).bias = nn.Parameter(bias.detach().clone())
    naive.requires_grad_(False)
    naive_biases = {n[: -len(".bias")]: p.requires_grad_() for n, p in naive.named_parameters() if n.endswith("bias")}
    assert naive_biases.keys() == biases(model).keys() and "lm_head" in naive_biases
    idx = tokens(base.config)
    ours, theirs = model(idx), naive(idx)
    assert rel_err(ours, theirs) < 1e-5
    ours.logsumexp(-1).mean().backward()
    theirs.logsumexp(-1).mean().backward()
    for name, bias in biases(model).items():
        assert rel_err(bias.grad, naive_biases[name].grad) < 1e-5, name


def test_7b_dry_run_counts_and_share(capsys):
    config = Config.from_name("7B")
    for head in (False, True):
        args = ["--model_name", "7B", "--dry_run", "true", "--bitfit.head", str(head).lower()]
        CLI(load_setup("bitfit"), args=args, as_positional=False)
        out = capsys.readouterr().out
        trainable = expected_count(config, head)
        assert f"trainable parameters: {trainable}\n" in out
        total = 6_738_415_616 + trainable  # the base model's own parameters plus the added biases
        assert f"total parameters: {total}\n" in out
        assert f"trainable share: {format_share(trainable, total)}\n" in out
    assert expected_count(config) == 32 * (4096 + 2 * 4096 + 4096 + 2 * 11008 + 4096) == 1_359_872
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # HF's LLaMA 7B with attention and MLP biases, not allocated
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                                          intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
                                          num_attention_heads=config.n_head, attention_bias=True, mlp_bias=True))
    counts = {kind: sum(p.numel() for n, p in hf.named_parameters() if n.endswith(kind)) for kind in ("bias", "")}
    assert counts == {"bias": 1_359_872, "": 6_739_775_488}
    assert format_share(1_359_872, 6_738_415_616 + 1_359_872) == "0.02%"


def test_seed_004_bitfit_share_of_its_mlp_next_to_llama_7b():
    """Seed 004, 3.1.c: an L = 10 layer MLP z_l = sigmoid(W_l z_{l-1} + b_l) with D_l = 2^(L-l) units, tuning only
    the b_l. D_0 (the inputs) follows the same formula, 2^10."""
    L = 10
    D = [2 ** (L - l) for l in range(L + 1)]
    weights = sum(D[l] * D[l - 1] for l in range(1, L + 1))
    bias_count = sum(D[l] for l in range(1, L + 1))
    assert (weights, bias_count) == (699_050, 1_023)
    assert format_share(bias_count, weights + bias_count) == "0.15%"  # 1023 / 700073 = 0.146%
    # BitFit on LLaMA 7B (biases added to the 7 block linears) trains a far smaller share than the tiny MLP
    assert format_share(1_359_872, 6_739_775_488) == "0.02%"


def test_tied_base_checkpoint_loads_with_and_without_the_head_tensor(tmp_path):
    base = base_model("tiny", tie_embeddings=True)
    idx = tokens(base.config)
    spec = MethodSpec("bitfit", BitFitConfig(head=True))
    for stored_head in (True, False):
        folder = tmp_path / str(stored_head)
        folder.mkdir()
        state = {k: v for k, v in base.state_dict().items() if stored_head or k != "lm_head.weight"}
        save_state_dict(state, folder / "lit_model.safetensors")
        model = prepare_model(spec, base.config, folder, torch.device("cpu"), torch.float32)
        assert model.lm_head.linear.weight is model.transformer.wte.weight
        assert model.lm_head.bitfit_bias.requires_grad and not model.transformer.wte.weight.requires_grad
        with torch.no_grad():
            assert torch.equal(model(idx), base(idx))


def test_base_state_dict_loads_under_the_wrapped_names():
    base = base_model("tiny-gqa")
    model = build_model(MethodSpec("bitfit", BitFitConfig(head=True)), base.config)
    result = model.load_state_dict(base.state_dict(), strict=False)  # ...q_proj.weight -> ...q_proj.linear.weight
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {f"{name}.bitfit_bias" for name in biases(model)}
    for layer in wrapped_layers(model, BitFitLinear).values():
        layer.reset_peft_parameters()
    idx = tokens(base.config)
    assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base_matches_its_dequantized_weights(mode):
    base = quantizable_base()
    model = bitfit_model(base, BitFitConfig())
    qmodel, deq_model = copy.deepcopy(model), copy.deepcopy(model)
    for name, layer in wrapped_layers(qmodel, BitFitLinear).items():
        layer.linear = _quantized(layer.linear, mode)
        with torch.no_grad():
            deq_model.get_submodule(name).linear.weight.copy_(_dequantized(layer.linear))
    idx = tokens(base.config)
    outs, grads = [], []
    for m in (qmodel, deq_model):
        out = m(idx)
        out.logsumexp(-1).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert len(grads[0]) == 7 * base.config.n_layer
    assert all(rel_err(g, grads[1][n]) < 1e-4 for n, g in grads[0].items())
