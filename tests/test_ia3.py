"""IA³ against HF PEFT's IA3Config on converted weights (float32), folding, quantized bases, counts and memory."""

import copy

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import CLI
from test_lora import _dequantized, _quantized, base_model, quantizable_base, rel_err, tokens
from test_model import hf_reference
from test_scripts import load_setup, run_script

from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_name
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import MethodSpec, build_model, format_share, mark_trainable
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.ia3 import IA3_LINEARS, IA3Config, IA3Linear
from lit_adapter.tuners.wrapping import wrapped_layers

ALL = dict(targets=IA3_LINEARS, feedforward=("up_proj", "down_proj"))


def ia3_layers(model: GPT):
    return wrapped_layers(model, IA3Linear)


def fold_for_inference(model: GPT) -> list:
    """The method's own inference preparation (every foldable layer folded); the layers left unfolded."""
    MethodSpec("ia3").definition.prepare_for_inference(model)
    return [name for name, layer in ia3_layers(model).items() if not layer.folded]


def ia3_model(base: GPT, cfg: IA3Config, perturb: bool = True) -> GPT:
    """An IA³ copy of ``base`` (``methods.build_model`` carrying its weights); with ``perturb`` the vectors are
    1 + noise, so the rescaling matters."""
    model = build_model(MethodSpec("ia3", cfg), base.config)
    report = model.load_state_dict(base.state_dict(), strict=False)
    assert report.unexpected_keys == [] and all(k.endswith(".ia3_l") for k in report.missing_keys)
    mark_trainable(model, MethodSpec("ia3", cfg))
    if perturb:
        with torch.no_grad():
            for layer in ia3_layers(model).values():
                layer.ia3_l.add_(torch.randn_like(layer.ia3_l) * 0.3)
    return model


def test_settings_default_to_peft_llama_targets_and_reject_impossible_values():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    cfg = IA3Config()
    assert set(cfg.targets) == set(TARGETS["llama"]) and set(cfg.feedforward) == set(FEEDFORWARD["llama"])
    assert cfg.outputs_scaled() == ("k_proj", "v_proj")
    # a comma-separated string and any order normalise to model order; feedforward names are kept to the targets
    assert IA3Config(targets="down_proj, q_proj").targets == ("q_proj", "down_proj")
    assert IA3Config(targets=["q_proj"]).feedforward == ()
    for bad, message in ((dict(targets=()), "targets nothing"), (dict(targets=("lm_head",)), "lm_head unknown"),
                         (dict(feedforward=("mlp",)), "mlp unknown")):
        with pytest.raises(UserError, match=message):
            IA3Config(**bad)


@pytest.mark.parametrize("name, cfg", [("tiny", IA3Config()), ("tiny-gqa", IA3Config(**ALL))])
def test_identity_at_init_and_gradients_only_on_the_vectors(name, cfg):
    base = base_model(name)
    model = ia3_model(base, cfg, perturb=False)
    idx = tokens(base.config)
    assert torch.equal(model(idx), base(idx))  # ones: bit for bit
    assert len(ia3_layers(model)) == len(cfg.targets) * base.config.n_layer
    model(idx).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert p.requires_grad == n.endswith("ia3_l"), n
        assert (p.grad is not None and p.grad.abs().sum() > 0) == n.endswith("ia3_l"), n


def _peft_ia3(base: GPT, cfg: IA3Config, defaults: bool):
    import peft

    hf = hf_reference(base.config, base).train()
    ia3_config = peft.IA3Config() if defaults else peft.IA3Config(target_modules=list(cfg.targets),
                                                                     feedforward_modules=list(cfg.feedforward))
    return peft.get_peft_model(hf, ia3_config)


def _peft_name(lit_layer: str) -> str:
    return "base_model.model." + lit_to_hf_name(lit_layer + ".weight")[: -len(".weight")] + ".ia3_l.default"


@pytest.mark.parametrize("name, cfg, defaults", [
    ("tiny", IA3Config(), True),  # PEFT with no targets given: its own LLaMA defaults
    ("tiny-gqa", IA3Config(), True),
    ("tiny-gqa", IA3Config(**ALL), False),
])
def test_matches_peft(name, cfg, defaults):
    base = base_model(name)
    model = ia3_model(base, cfg)
    peft_model = _peft_ia3(base, cfg, defaults)
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for layer_name, layer in ia3_layers(model).items():
            theirs = peft_params[_peft_name(layer_name)]  # (out, 1) or, feedforward, (1, in)
            assert theirs.numel() == layer.ia3_l.numel()
            assert theirs.shape[0 if layer.feedforward else 1] == 1
            theirs.copy_(layer.ia3_l.view_as(theirs))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == peft_model.get_nb_trainable_parameters()[0]
    assert sum("ia3_l" in n for n in peft_params) == len(ia3_layers(model))

    idx = tokens(base.config)
    targets = torch.randint(0, base.config.vocab_size, idx.shape)
    ours, theirs = model(idx), peft_model(input_ids=idx).logits
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, base(idx)) > 1e-2  # the rescaling is not negligible
    F.cross_entropy(ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets.flatten()).backward()
    for layer_name, layer in ia3_layers(model).items():
        assert rel_err(layer.ia3_l.grad, peft_params[_peft_name(layer_name)].grad.flatten()) < 1e-5, layer_name


def test_folding_gives_the_same_logits_and_unfolds():
    base = base_model("tiny-gqa")
    model = ia3_model(base, IA3Config(**ALL)).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    idx = tokens(base.config)
    with torch.no_grad():
        unfolded = model(idx)
        assert fold_for_inference(model) == []
        folded_weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert rel_err(model(idx), unfolded) < 1e-5
        fold_for_inference(model)  # a second fold changes nothing
        assert all(torch.equal(v, folded_weights[k]) for k, v in model.state_dict().items())
    k = model.transformer.h[0].attn.k_proj  # an output scale multiplies rows, an input scale columns
    down = model.transformer.h[0].mlp.down_proj
    assert torch.equal(k.linear.weight, original["transformer.h.0.attn.k_proj.linear.weight"] * k.ia3_l[:, None])
    assert torch.equal(down.linear.weight,
                       original["transformer.h.0.mlp.down_proj.linear.weight"] * down.ia3_l[None, :])
    with pytest.raises(RuntimeError, match="unfold"):
        model.train()(idx).sum().backward()
    for layer in ia3_layers(model.eval()).values():
        layer.unfold()
    for key, value in model.state_dict().items():
        assert (value - original[key]).abs().max() < 1e-6, key
    with torch.no_grad():
        assert rel_err(model(idx), unfolded) < 1e-5
        k.ia3_l[0] = 0.0
        k.fold()
        with pytest.raises(UserError, match="scale of 0"):  # that row of the weight is gone
            k.unfold()


def test_a_bad_target_is_a_one_line_error_on_the_command_line():
    proc = run_script("finetune/ia3.py", "--model_name", "tiny", "--dry_run", "true", "--ia3.targets", "[k_proj, lm_head]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: ia3 targets lm_head unknown; choose from " + ", ".join(IA3_LINEARS)], proc.stderr


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base_stays_unfolded_and_matches_its_dequantized_weights(mode):
    base = quantizable_base()
    model = ia3_model(base, IA3Config())
    qmodel, deq_model = copy.deepcopy(model), copy.deepcopy(model)
    for name, layer in ia3_layers(qmodel).items():
        layer.linear = _quantized(layer.linear, mode)
        with torch.no_grad():
            deq_model.get_submodule(name).linear.weight.copy_(_dequantized(layer.linear))
    idx = tokens(base.config)
    targets = torch.randint(0, base.config.vocab_size, idx.shape)
    outs, grads = [], []
    for m in (qmodel, deq_model):
        out = m(idx)
        F.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(ia3_layers(qmodel))
    assert all(rel_err(g, grads[1][n]) < 1e-4 for n, g in grads[0].items())
    with pytest.raises(UserError, match="quantized"):
        qmodel.transformer.h[0].attn.k_proj.fold()
    qmodel.eval()
    with torch.no_grad():
        before = qmodel(idx)
        assert len(fold_for_inference(qmodel)) == len(ia3_layers(qmodel))  # what load_finetuned does: none folds
        assert torch.equal(qmodel(idx), before)


def test_base_checkpoint_loads_into_a_meta_model():
    base = base_model("tiny-gqa")
    with torch.device("meta"):
        model = build_model(MethodSpec("ia3"), base.config)
    result = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    assert set(result.missing_keys) == {f"transformer.h.{i}.{m}.ia3_l" for i in range(base.config.n_layer)
                                        for m in ("attn.k_proj", "attn.v_proj", "mlp.down_proj")}
    assert result.unexpected_keys == []
    for layer in ia3_layers(model).values():
        layer.reset_peft_parameters()
    assert not any(p.is_meta for p in model.parameters())
    idx = tokens(base.config)
    assert torch.equal(model(idx), base(idx))


def _dry_run_7b(capsys, *options) -> str:
    CLI(load_setup("ia3"), args=["--model_name", "7B", "--dry_run", "true", *options], as_positional=False)
    return capsys.readouterr().out


def test_7b_dry_run_counts_and_share(capsys):
    config = Config.from_name("7B")
    C, I, L, kv = config.n_embd, config.intermediate_size, config.n_layer, config.n_query_groups * config.head_size
    out = _dry_run_7b(capsys)
    assert L * (2 * kv + I) == 614_400
    assert "trainable parameters: 614400\n" in out and "total parameters: 6739030016\n" in out
    assert f"trainable share: {format_share(614_400, 6_739_030_016)}\n" in out and "share: 0.01%" in out
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # PEFT's own counts on HF's LLaMA 7B, without allocating it
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=config.vocab_size, hidden_size=C, intermediate_size=I,
                                          num_hidden_layers=L, num_attention_heads=config.n_head))
        assert peft.get_peft_model(hf, peft.IA3Config()).get_nb_trainable_parameters() == (614_400, 6_739_030_016)
    everything = ["--ia3.targets", f"[{', '.join(IA3_LINEARS)}]", "--ia3.feedforward", "[up_proj, down_proj]"]
    out = _dry_run_7b(capsys, *everything)
    trainable = L * (C + kv + kv + C + I + C + I)  # q, k, v, o and gate scale their outputs, up and down their inputs
    assert f"trainable parameters: {trainable}\n" in out
    assert f"trainable share: {format_share(trainable, 6_738_415_616 + trainable)}\n" in out


def test_help_documents_the_settings(capsys):
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as lit_adapter.cli.finetune.cli does
    with pytest.raises(SystemExit):
        CLI(load_setup("ia3"), args=["--help"], as_positional=False)
    text = capsys.readouterr().out
    assert "Liu et al. 2022" in text and "--ia3.targets" in text and "feedforward_modules" in text


def test_ia3_layer_wraps_an_already_quantized_linear():
    linear = _quantized(torch.nn.Linear(64, 32, bias=False), "int8")
    layer = IA3Linear(linear)
    assert layer.ia3_l.dtype == torch.float32 and layer.ia3_l.shape == (32,)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.ia3_l.fill_(2.0)
        assert torch.allclose(layer(x), 2 * linear(x))
