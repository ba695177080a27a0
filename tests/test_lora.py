"""LoRA against HF PEFT as the oracle, merging, checkpoint loading and quantized (bitsandbytes) bases, in float32."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hf_oracle import hf_llama

from lit_adapter.model.config import Config
from lit_adapter.convert import hf_to_lit_state_dict, lit_to_hf_name
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import MethodSpec, build_model, get_method, mark_trainable, trainable_filter
from lit_adapter.tuners.wrapping import wrapped_layers
from lit_adapter.tuners.lora import (
    LoRAConfig,
    LoRALinear,
)
from lit_adapter.model.gpt import GPT

ALL = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def base_model(name: str = "tiny", **overrides) -> GPT:
    model = GPT(Config.from_name(name, **overrides))
    model.init_weights()
    return model


def with_lora(base: GPT, cfg: LoRAConfig) -> GPT:
    """``methods.build_model``'s LoRA model carrying ``base``'s weights (A and B at their initial values)."""
    model = build_model(MethodSpec("lora", cfg), base.config)
    report = model.load_state_dict(base.state_dict(), strict=False)
    assert report.unexpected_keys == [] and all("lora_" in k for k in report.missing_keys)
    return model.train(base.training)


def lora_layers(model: GPT):
    return wrapped_layers(model, LoRALinear)


def mark_lora_trainable(model: GPT, cfg: LoRAConfig = None) -> GPT:
    mark_trainable(model, MethodSpec("lora", cfg or LoRAConfig()))
    return model


def is_lora(name: str) -> bool:
    return trainable_filter(MethodSpec("lora"))(name)


def merge_for_inference(model: GPT) -> list:
    """The method's own inference preparation (every mergeable layer merged); the layers left unmerged."""
    get_method("lora").prepare_for_inference(model)
    return [name for name, layer in lora_layers(model).items() if not layer.merged]


def merged_state_dict(model: GPT) -> dict:
    """A plain base checkpoint (base names) of a merged copy of ``model``, the copy merged layer by layer."""
    model = copy.deepcopy(model)
    for layer in lora_layers(model).values():
        layer.merge()
    return {k.replace(".linear.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def lora_model(base: GPT, cfg: LoRAConfig, random_lora: bool = True) -> GPT:
    """A LoRA copy of ``base``; with ``random_lora`` B is non-zero too, so the update matters."""
    model = with_lora(base, cfg)
    if random_lora:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_A.normal_(0, 0.1)
                layer.lora_B.normal_(0, 0.1)
    return model


def tokens(config: Config, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T))


def test_config_validation_and_targets():
    assert LoRAConfig().target_names() == ["q_proj", "v_proj"]
    assert LoRAConfig(**ALL).target_names() == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"
    ]
    for bad in (dict(r=0), dict(r=2.5), dict(alpha=0), dict(alpha=-1.0), dict(dropout=1.0), dict(dropout=-0.1),
                dict(query=False, value=False)):
        with pytest.raises(UserError):
            LoRAConfig(**bad)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_init_leaves_logits_unchanged(name):
    base = base_model(name)
    model = with_lora(base, LoRAConfig(r=4, alpha=8, **ALL))
    assert len(lora_layers(model)) == 7 * base.config.n_layer + 1
    idx = tokens(base.config)
    assert torch.equal(model(idx), base(idx))  # B = 0: bit for bit
    for layer in lora_layers(model).values():
        assert layer.lora_B.abs().max() == 0
        # kaiming_uniform_(a=sqrt(5)) as PEFT: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.lora_A.abs().max() <= bound
        assert layer.lora_A.abs().max() > 0.75 * bound
        assert layer.scaling == 2.0


def test_gradients_only_on_lora():
    base = base_model()
    cfg = LoRAConfig(r=4, dropout=0.1, mlp=True)
    model = lora_model(base, cfg)
    mark_lora_trainable(model, cfg)
    idx = tokens(model.config)
    model(idx).logsumexp(-1).mean().backward()
    lora = {n for n, _ in model.named_parameters() if is_lora(n)}
    assert len(lora) == 2 * 5 * model.config.n_layer
    for name, param in model.named_parameters():
        if name in lora:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert set(get_method("lora").final_tensors(model, cfg)[0]) == lora  # what final/ holds


def _peft_model(base: GPT, r: int, alpha: float, targets):
    import peft

    hf = hf_llama(base)
    lora_config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, init_lora_weights=False
    )
    return peft.get_peft_model(hf, lora_config)


def _peft_name(lit_layer: str, matrix: str) -> str:
    hf_layer = lit_to_hf_name(lit_layer + ".weight")[: -len(".weight")]
    return f"base_model.model.{hf_layer}.{matrix}.default.weight"


@pytest.mark.parametrize(
    "name, targets",
    [
        ("tiny", dict(query=True, value=True)),
        ("tiny", dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)),
        ("tiny-gqa", dict(query=True, key=True, value=True, projection=True, mlp=True)),
    ],
)
def test_matches_peft(name, targets):
    base = base_model(name)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, **targets)
    model = lora_model(base, cfg)
    peft_model = _peft_model(base, cfg.r, cfg.alpha, cfg.target_names())

    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for layer_name, layer in lora_layers(model).items():
            peft_params[_peft_name(layer_name, "lora_A")].copy_(layer.lora_A)
            peft_params[_peft_name(layer_name, "lora_B")].copy_(layer.lora_B)
    assert sum("lora_" in n for n in peft_params) == 2 * len(lora_layers(model))
    mark_lora_trainable(model, cfg)

    idx = tokens(base.config)
    targets_ = torch.randint(0, base.config.vocab_size, idx.shape)
    ours, theirs = model(idx), peft_model(input_ids=idx).logits
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, base(idx)) > 1e-2  # the update is not negligible
    F.cross_entropy(ours.flatten(0, 1), targets_.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets_.flatten()).backward()
    for layer_name, layer in lora_layers(model).items():
        for matrix in ("lora_A", "lora_B"):
            grad = getattr(layer, matrix).grad
            assert rel_err(grad, peft_params[_peft_name(layer_name, matrix)].grad) < 1e-4, (layer_name, matrix)

    merged = merged_state_dict(model)
    assert not any(layer.merged for layer in lora_layers(model).values())  # the model is left as it was
    assert set(merged) == set(base.state_dict())
    peft_merged = hf_to_lit_state_dict(peft_model.merge_and_unload().state_dict())
    for key, value in merged.items():
        assert (value - peft_merged[key]).abs().max() < 1e-6, key


def test_merge_unmerge_idempotent_and_exact():
    base = base_model("tiny-gqa")
    model = lora_model(base, LoRAConfig(r=4, alpha=8, dropout=0.0, **ALL)).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    idx = tokens(model.config)
    with torch.no_grad():
        unmerged_out = model(idx)
        assert merge_for_inference(model) == []
        assert all(layer.merged for layer in lora_layers(model).values())
        merged_once = {k: v.clone() for k, v in model.state_dict().items()}
        merged_out = model(idx)
        merge_for_inference(model)
        assert all(torch.equal(v, merged_once[k]) for k, v in model.state_dict().items())
    assert rel_err(merged_out, unmerged_out) < 1e-5
    q = model.transformer.h[0].attn.q_proj
    assert torch.equal(q.linear.weight, original["transformer.h.0.attn.q_proj.linear.weight"] + q.delta_weight())

    for layer in lora_layers(model).values():
        layer.unmerge()
    restored = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in lora_layers(model).values():
        layer.unmerge()
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored[key])  # second unmerge is a no-op
        assert (value - original[key]).abs().max() < 1e-7, key  # round trip up to float rounding
    assert not any(layer.merged for layer in lora_layers(model).values())
    with torch.no_grad():
        assert rel_err(model(idx), unmerged_out) < 1e-6


def test_training_a_merged_layer_is_refused():
    model = lora_model(base_model(), LoRAConfig(r=2))
    mark_lora_trainable(model, LoRAConfig(r=2))
    merge_for_inference(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.train()(tokens(model.config))
    with torch.no_grad():
        model(tokens(model.config))  # evaluation inside a training run is fine


def test_dropout_only_on_lora_branch():
    base = base_model()
    idx = tokens(base.config)
    model = lora_model(base, LoRAConfig(r=4, dropout=0.5), random_lora=False).train()
    assert torch.equal(model(idx), base(idx))  # B = 0: dropout on the branch cannot touch the base path
    model = lora_model(base, LoRAConfig(r=4, dropout=0.5))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), model(idx))
        assert not torch.allclose(model.train()(idx), model.eval()(idx))


def test_base_checkpoint_loads_into_meta_lora_model():
    base = base_model("tiny-gqa")
    cfg = LoRAConfig(r=4, mlp=True)
    with torch.device("meta"):
        model = build_model(MethodSpec("lora", cfg), base.config)
    assert model.transformer.h[0].attn.q_proj.lora_A.is_meta
    result = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    lora_keys = {f"transformer.h.{i}.{m}.{x}" for i in range(base.config.n_layer)
                 for m in ("attn.q_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
                 for x in ("lora_A", "lora_B")}
    assert set(result.missing_keys) == lora_keys
    assert result.unexpected_keys == []
    for layer in lora_layers(model).values():
        layer.reset_peft_parameters()  # the TunerLayer protocol: allocated beside the base weight, then initialised
    assert not any(p.is_meta for p in model.parameters())
    assert all(layer.lora_B.abs().max() == 0 and layer.lora_A.abs().max() > 0
               for layer in lora_layers(model).values())
    idx = tokens(base.config)
    assert torch.equal(model(idx), base(idx))
    # strict loading of a base checkpoint fails only on the LoRA keys
    with pytest.raises(RuntimeError, match="lora_A"):
        build_model(MethodSpec("lora", cfg), base.config).load_state_dict(base.state_dict())


def test_merged_state_dict_loads_into_plain_gpt():
    base = base_model()
    model = lora_model(base, LoRAConfig(r=4, alpha=4, dropout=0.0, **ALL)).eval()
    plain = GPT(base.config)
    plain.load_state_dict(merged_state_dict(model))  # strict: exactly the base names
    idx = tokens(base.config)
    with torch.no_grad():
        assert rel_err(plain(idx), model(idx)) < 1e-5
        merge_for_inference(model)
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged_state_dict(model).items())


def test_tied_head_keeps_tie_and_is_not_merged():
    base = base_model("tiny", tie_embeddings=True)
    model = lora_model(base, LoRAConfig(r=2, dropout=0.0, query=True, head=True)).eval()
    assert model.lm_head.linear.weight is model.transformer.wte.weight
    assert model.lm_head.weight_is_shared and not model.transformer.h[0].attn.q_proj.weight_is_shared
    embedding = model.transformer.wte.weight.clone()
    idx = tokens(base.config)
    with torch.no_grad():
        before = model(idx)
        with pytest.raises(UserError, match="shared"):
            model.lm_head.merge()
        assert merge_for_inference(model) == ["lm_head"]
        assert torch.equal(model.transformer.wte.weight, embedding)
        assert model.transformer.h[0].attn.q_proj.merged and not model.lm_head.merged
        assert rel_err(model(idx), before) < 1e-5
    with pytest.raises(UserError, match="shared"):
        merged_state_dict(model)


def _quantized(linear: nn.Linear, mode: str) -> nn.Module:
    """The bitsandbytes counterpart of ``linear`` on CPU: the weights are quantized by the move ``.to("cpu")``."""
    import bitsandbytes as bnb

    weight = linear.weight.data.clone()
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def quantizable_base() -> GPT:
    # bitsandbytes 0.50's native CPU dequantize_4bit is wrong when in_features is a multiple of 16 but not of the
    # block size (64), e.g. the tiny config's n_embd=32 (relative weight error ~0.4 instead of ~0.09). Real
    # LLaMA widths are multiples of 64, and so are these.
    return base_model("tiny", n_embd=64, intermediate_size=128)


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes layer actually computes with."""
    import bitsandbytes as bnb

    weight = layer.weight
    if hasattr(weight, "quant_state"):  # Params4bit
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data.float() * weight.SCB[:, None] / 127  # Int8Params: int8 rows scaled by their absmax / 127


def _loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits, {n: p.grad for n, p in model.named_parameters() if is_lora(n)}


# Logits vs the float32 model (relative max error), measured over 4 seeds: int8 6e-3..9e-3, nf4 0.11..0.16; LoRA
# gradients: int8 1e-2..2.3e-2, nf4 0.22..0.28. Against the float model holding the dequantized weights, both
# agree to float rounding: that is what pins the LoRA arithmetic over a quantized base.
@pytest.mark.parametrize("mode, logit_tol, grad_tol", [("int8", 2e-2, 5e-2), ("nf4", 0.3, 0.5)])
def test_lora_over_quantized_base(mode, logit_tol, grad_tol):
    base = quantizable_base()
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True)
    model = lora_model(base, cfg)
    qmodel, deq_model = copy.deepcopy(model), copy.deepcopy(model)
    for name, layer in lora_layers(qmodel).items():
        layer.linear = _quantized(layer.linear, mode)
        with torch.no_grad():
            deq_model.get_submodule(name).linear.weight.copy_(_dequantized(layer.linear))
    assert type(qmodel.transformer.h[0].attn.q_proj.linear.weight).__module__.startswith("bitsandbytes")
    for m in (model, qmodel, deq_model):
        mark_lora_trainable(m, cfg)

    # layer level: the LoRA branch adds the same update to the quantized base output (up to float rounding)
    x = torch.randn(2, 5, base.config.n_embd)
    fp_layer, q_layer = model.transformer.h[0].attn.q_proj, qmodel.transformer.h[0].attn.q_proj
    with torch.no_grad():
        update = fp_layer(x) - fp_layer.linear(x)
        assert update.abs().max() > 0.1
        assert (q_layer(x) - q_layer.linear(x) - update).abs().max() < 1e-6

    idx = tokens(base.config)
    targets = torch.randint(0, base.config.vocab_size, idx.shape)
    out, grads = _loss_and_grads(model, idx, targets)
    qout, qgrads = _loss_and_grads(qmodel, idx, targets)
    deq_out, deq_grads = _loss_and_grads(deq_model, idx, targets)

    assert rel_err(qout, deq_out) < 1e-5
    assert rel_err(qout, out) < logit_tol
    assert len(qgrads) == 2 * len(lora_layers(qmodel))
    for name, grad in qgrads.items():
        assert rel_err(grad, deq_grads[name]) < 1e-4, name
        assert rel_err(grad, grads[name]) < grad_tol, name
    for name, param in qmodel.named_parameters():
        if not is_lora(name):
            assert not param.requires_grad and param.grad is None, name

    with pytest.raises(UserError, match="quantized"):
        qmodel.transformer.h[0].attn.q_proj.merge()
    assert len(merge_for_inference(qmodel)) == len(lora_layers(qmodel))
    with pytest.raises(UserError, match="quantized"):
        merged_state_dict(qmodel)


def test_add_lora_after_quantizing():
    base = quantizable_base()
    qbase = copy.deepcopy(base)
    for block in qbase.transformer.h:
        block.attn.q_proj = _quantized(block.attn.q_proj, "nf4")
        block.attn.v_proj = _quantized(block.attn.v_proj, "int8")
    idx = tokens(base.config)
    with torch.no_grad():
        reference = qbase(idx)
    model = qbase
    get_method("lora").attach(model, LoRAConfig(r=4))
    q = model.transformer.h[0].attn.q_proj
    assert isinstance(q, LoRALinear) and type(q.linear).__name__ == "Linear4bit"
    assert q.lora_A.dtype == torch.float32 and q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4)
    with torch.no_grad():
        assert torch.equal(model(idx), reference)  # B = 0


def test_trainable_count_on_7b_and_state_dict_round_trip():
    with torch.device("meta"):
        model = mark_lora_trainable(build_model(MethodSpec("lora"), Config.from_name("7B")))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4_194_304  # PEFT's count for LLaMA-7B, r=8 on q_proj and v_proj: 32 * 2 * 8 * (4096 + 4096)

    source = lora_model(base_model(), LoRAConfig(r=2, mlp=True))
    spec = MethodSpec("lora", LoRAConfig(r=2, mlp=True))
    target = build_model(spec, source.config)
    target.load_state_dict(source.state_dict())  # strict: the wrapped names load as they are
    partial = build_model(spec, source.config)
    result = partial.load_state_dict(spec.definition.final_tensors(source, spec.settings)[0], strict=False)
    assert result.unexpected_keys == [] and not any(is_lora(k) for k in result.missing_keys)
    idx = tokens(source.config)
    with torch.no_grad():
        assert torch.equal(target.eval()(idx), source.eval()(idx))
        assert torch.equal(partial.transformer.h[1].mlp.up_proj.lora_B, source.transformer.h[1].mlp.up_proj.lora_B)


def test_lora_on_a_tied_head_keeps_the_tie(stories260k):
    """stories260K ties its head to the embedding; re-tying after loading must reach the wrapped head."""
    from lit_adapter.model.config import Config
    from lit_adapter.tuners.registry import MethodSpec, prepare_model

    config = Config.from_checkpoint_dir(stories260k)
    assert config.tie_embeddings
    spec = MethodSpec("lora", LoRAConfig(r=2, alpha=4, dropout=0.0, head=True))
    model = prepare_model(spec, config, stories260k, torch.device("cpu"), torch.float32)
    assert model.lm_head.linear.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters(remove_duplicate=False))
    assert model.lm_head.weight_is_shared
