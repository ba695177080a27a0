"""LoRA's variants (DoRA, rsLoRA, PiSSA, OLoRA, LoRA+) against HF PEFT as the oracle, in float32: logits,
gradients of every trained tensor and merged weights; LoRA+'s optimizer groups and one step; 7B trainable counts;
training on an NF4 base (QDoRA, QPiSSA); exact resume; ``final/`` reloading; the PEFT export."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_oracle import hf_llama, peft_param_name
from jsonargparse import CLI
from safetensors.torch import load_file

from lit_adapter.tuners import registry as methods
from lit_adapter.model.config import Config
from lit_adapter.convert import hf_to_lit_state_dict
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import MethodSpec, build_model, load_finetuned, mark_trainable, prepare_model
from lit_adapter.train.optim import build_optimizer
from lit_adapter.model.quantize import dequantized_weight
from lit_adapter.tuners.dora import DoRALinear
from lit_adapter.tuners.lora import LoRALinear
from test_lora import base_model, quantizable_base, rel_err, tokens
from test_export import tok512  # noqa: F401 (fixture)
from test_scripts import load_setup
from test_training import run
from test_training import test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one as check_exact_resume

ALL = dict(query=True, key=True, value=True, projection=True, mlp=True)
PEFT_OPTIONS = {"dora": dict(use_dora=True), "rslora": dict(use_rslora=True), "pissa": dict(init_lora_weights="pissa"),
                "olora": dict(init_lora_weights="olora"), "loraplus": {}}
VARIANTS = tuple(PEFT_OPTIONS)


def variant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def ours_on(base, method, settings):
    """``method``'s model on ``base``'s weights through the public path, its trainable tensors marked; a residual
    variant (PiSSA, OLoRA) factors the base as the loader does."""
    spec = MethodSpec(method, settings)
    model = build_model(spec, base.config)
    model.load_state_dict(base.state_dict(), strict=False)  # the wrappers accept the base names
    for layer in variant_layers(model).values():
        layer.reset_peft_parameters()  # DoRA's magnitude from the loaded weights
    spec.definition.initialize_from_base(model, settings, None)
    mark_trainable(model, spec)
    return model, spec


def peft_on(base, method, settings):
    import peft

    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0,
                             target_modules=settings.target_names(),
                             **{"init_lora_weights": False, **PEFT_OPTIONS[method]})
    return peft.get_peft_model(hf_llama(base), config)


def trained_names(layer):
    return [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]


@pytest.mark.parametrize("method", ["dora", "rslora", "pissa", "olora"])
@pytest.mark.parametrize("name, targets", [("tiny", dict(query=True, value=True)), ("tiny-gqa", ALL)])
def test_matches_peft(method, name, targets):
    torch.manual_seed(0)
    base = base_model(name)
    settings = methods.get_method(method).settings_cls(r=4, alpha=8, dropout=0.0, **targets)
    model, _ = ours_on(base, method, settings)
    peft_model = peft_on(base, method, settings)
    theirs = dict(peft_model.named_parameters())
    layers = variant_layers(model)
    assert sum(p.requires_grad for p in theirs.values()) == sum(len(trained_names(m)) for m in layers.values())

    idx = tokens(base.config)
    if method in ("pissa", "olora"):  # the initialisation itself: A, B and the residual base are PEFT's
        with torch.no_grad():
            assert rel_err(model(idx), base(idx)) < 1e-5  # W_res + s B A = W
        for layer_name, layer in layers.items():
            for tensor in ("lora_A", "lora_B"):
                assert rel_err(getattr(layer, tensor), theirs[peft_param_name(layer_name, tensor)]) < 1e-5
            residual = theirs[peft_param_name(layer_name, "base_layer").replace(".default", "")]
            assert (layer.linear.weight - residual).abs().max() < 1e-6, layer_name
    with torch.no_grad():  # move every trained tensor off its initial value, identically in both models
        for layer_name, layer in layers.items():
            for tensor in trained_names(layer):
                param = getattr(layer, tensor)
                param.add_(torch.randn_like(param) * 0.1 * (param.abs().mean() + 0.1))
                theirs[peft_param_name(layer_name, tensor)].copy_(param.reshape(theirs[peft_param_name(
                    layer_name, tensor)].shape))

    targets_ = torch.randint(0, base.config.vocab_size, idx.shape)
    ours, peft_out = model(idx), peft_model(input_ids=idx).logits
    assert rel_err(ours, peft_out) < 1e-5
    assert rel_err(ours, base(idx)) > 1e-2  # the update is not negligible
    F.cross_entropy(ours.flatten(0, 1), targets_.flatten()).backward()
    F.cross_entropy(peft_out.flatten(0, 1), targets_.flatten()).backward()
    for layer_name, layer in layers.items():
        for tensor in trained_names(layer):
            grad = getattr(layer, tensor).grad
            assert rel_err(grad, theirs[peft_param_name(layer_name, tensor)].grad) < 1e-5, (layer_name, tensor)

    model.eval()
    methods.get_method(method).prepare_for_inference(model)  # folds every layer (LoRA's inference path)
    assert all(layer.merged for layer in layers.values())
    with torch.no_grad():
        assert rel_err(model(idx), ours) < 1e-5
    folded = {k.replace(".linear.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    peft_merged = hf_to_lit_state_dict(peft_model.merge_and_unload().state_dict())
    assert set(folded) == set(peft_merged)
    for key, value in folded.items():
        assert (value - peft_merged[key]).abs().max() < 1e-6, key


def test_dora_unmerges_and_starts_as_the_base():
    base = base_model("tiny-gqa")
    settings = methods.get_method("dora").settings_cls(r=4, alpha=8, dropout=0.0, **ALL)
    model, _ = ours_on(base, "dora", settings)
    idx = tokens(base.config)
    with torch.no_grad():
        assert rel_err(model(idx), base(idx)) < 1e-6  # B = 0 and m = ||W||_c
        for layer in variant_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1.1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(idx)
        model.eval()
        for layer in variant_layers(model).values():
            layer.merge()
            layer.unmerge()
        assert all((v - before[k]).abs().max() < 1e-6 for k, v in model.state_dict().items())
        assert rel_err(model(idx), out) < 1e-6


@pytest.mark.parametrize("method, expected", [("dora", 4_194_304 + 2 * 32 * 4096), ("rslora", 4_194_304),
                                              ("pissa", 4_194_304), ("olora", 4_194_304), ("loraplus", 4_194_304)])
def test_7b_dry_run_counts_equal_peft(capsys, method, expected):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    CLI(load_setup(method), args=["--model_name", "7B", "--dry_run", "true"], as_positional=False)
    out = capsys.readouterr().out
    config = Config.from_name("7B")
    with torch.device("meta"):  # PEFT's own count on HF's LLaMA 7B, without allocating it
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                                          intermediate_size=config.intermediate_size,
                                          num_hidden_layers=config.n_layer, num_attention_heads=config.n_head))
        # PiSSA's and OLoRA's factorisations cannot run on meta; their initialisation does not change the count
        options = {k: v for k, v in PEFT_OPTIONS[method].items() if k != "init_lora_weights"}
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], **options)
        trainable, total = peft.get_peft_model(hf, lora).get_nb_trainable_parameters()
    assert trainable == expected
    assert f"trainable parameters: {trainable}\n" in out and f"total parameters: {total}\n" in out


@pytest.mark.parametrize("norms", [False, True])
def test_loraplus_groups_and_step_equal_peft(norms):
    import peft
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = base_model("tiny-gqa")
    settings = methods.get_method("loraplus").settings_cls(r=4, alpha=8, dropout=0.0, lr_ratio=8.0, mlp=True,
                                                         train_norms=norms)
    model, spec = ours_on(base, "loraplus", settings)
    peft_model = peft.get_peft_model(hf_llama(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=settings.target_names(), init_lora_weights=False))
    theirs = dict(peft_model.named_parameters())
    hf_norm = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm"}

    def peft_name(ours_name):
        module, _, tensor = ours_name.rpartition(".")
        if tensor.startswith("lora_"):
            return peft_param_name(module, tensor)
        if module == "transformer.ln_f":
            return "base_model.model.model.norm.weight"
        i, norm = module.split(".")[2], module.split(".")[3]
        return f"base_model.model.model.layers.{i}.{hf_norm[norm]}.weight"

    ours_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in ours_params.items():
            if "lora_" in name:
                param.normal_(0, 0.1)
            theirs[peft_name(name)].copy_(param)
            theirs[peft_name(name)].requires_grad_(True)
    assert len(ours_params) == sum(p.requires_grad for p in theirs.values())

    lr, weight_decay = 1e-3, 0.01
    groups = spec.definition.param_groups(model, settings, lr, weight_decay)
    optimizer = build_optimizer(groups, "adamw", lr=lr, weight_decay=weight_decay)
    peft_optimizer = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=8.0,
                                               loraplus_weight_decay=weight_decay)
    name_of = {id(p): n for n, p in ours_params.items()}
    peft_name_of = {id(p): n for n, p in theirs.items()}

    def described(opt, names):
        return sorted((g["lr"], g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
                      for g in opt.param_groups if g["params"])
    ours_groups = [(lr_, wd, tuple(sorted(peft_name(n) for n in names)))
                   for lr_, wd, names in described(optimizer, name_of)]
    assert sorted(ours_groups) == described(peft_optimizer, peft_name_of)
    assert {g["lr"] for g in optimizer.param_groups} == {lr, 8 * lr}

    idx = tokens(base.config)
    targets = torch.randint(0, base.config.vocab_size, idx.shape)
    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(peft_model(input_ids=idx).logits.flatten(0, 1), targets.flatten()).backward()
    optimizer.step()
    peft_optimizer.step()
    for name, param in ours_params.items():
        assert rel_err(param, theirs[peft_name(name)]) < 1e-6, name


def test_qdora_magnitude_is_the_dequantized_norm_and_trains(tmp_path, stories_checkpoint, instruction_data):
    import bitsandbytes as bnb

    config = Config.from_checkpoint_dir(stories_checkpoint)
    model = prepare_model(MethodSpec("dora", quantize="bnb.nf4"), config, stories_checkpoint, torch.device("cpu"),
                          torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}
    assert layers and all(isinstance(m.linear, bnb.nn.Linear4bit) for m in layers.values())
    for layer in layers.values():  # m = ||dequant(W)||_c: the model starts as the quantized base (PEFT's QDoRA)
        norm = torch.linalg.norm(dequantized_weight(layer.linear), dim=1)
        assert torch.allclose(layer.lora_magnitude_vector, norm, rtol=1e-6)
    result = run(tmp_path, stories_checkpoint, instruction_data, method="dora", steps=8, quantize="bnb.nf4",
                 learning_rate=2e-2)
    assert result.final_val_loss < result.initial_val_loss
    _, loaded, _ = load_finetuned(stories_checkpoint, tmp_path / "final", torch.device("cpu"), torch.float32)
    assert torch.isfinite(loaded(torch.randint(0, config.vocab_size, (1, 16)))).all()


def test_qpissa_factors_the_full_precision_weight_and_trains(tmp_path, stories_checkpoint, instruction_data):
    result = run(tmp_path, stories_checkpoint, instruction_data, method="pissa", steps=8, quantize="bnb.nf4",
                 learning_rate=2e-2)
    assert result.final_val_loss < result.initial_val_loss
    config = Config.from_checkpoint_dir(stories_checkpoint)
    plain = prepare_model(MethodSpec("pissa"), config, stories_checkpoint, torch.device("cpu"), torch.float32)
    quantized = prepare_model(MethodSpec("pissa", quantize="bnb.nf4"), config, stories_checkpoint,
                              torch.device("cpu"), torch.float32)
    q, p = quantized.transformer.h[0].attn.q_proj, plain.transformer.h[0].attn.q_proj
    assert torch.equal(q.lora_A, p.lora_A) and torch.equal(q.lora_B, p.lora_B)  # A, B of the full-precision W
    # the residual is what is quantized: dequantized, it is near the full-precision residual
    assert rel_err(dequantized_weight(q.linear), p.linear.weight) < 0.2


@pytest.mark.parametrize("method", ["rslora", "olora", "loraplus"])
def test_the_other_variants_train_on_an_nf4_base(tmp_path, stories_checkpoint, instruction_data, method):
    """QDoRA and QPiSSA above; rsLoRA, OLoRA (its residual quantized after the factorisation) and LoRA+ too: the
    validation loss falls, and final/ reloads onto the quantized base the run recorded."""
    import bitsandbytes as bnb

    result = run(tmp_path, stories_checkpoint, instruction_data, method=method, steps=6, quantize="bnb.nf4",
                 learning_rate=2e-2)
    assert result.final_val_loss < result.initial_val_loss
    _, loaded, spec = load_finetuned(stories_checkpoint, tmp_path / "final", torch.device("cpu"), torch.float32)
    assert spec.quantize == "bnb.nf4" and isinstance(loaded.transformer.h[0].attn.q_proj.linear, bnb.nn.Linear4bit)
    config = Config.from_checkpoint_dir(stories_checkpoint)
    assert torch.isfinite(loaded(torch.randint(0, config.vocab_size, (1, 16)))).all()


@pytest.mark.parametrize("method", VARIANTS)
def test_final_reloads_to_the_trained_logits(tmp_path, stories_checkpoint, instruction_data, monkeypatch, method):
    trained = {}
    save = methods.save_adapter

    def keep_model(model, *args):
        trained["model"] = methods.unwrap(model)
        return save(model, *args)

    monkeypatch.setattr(methods, "save_adapter", keep_model)
    result = run(tmp_path, stories_checkpoint, instruction_data, method=method, steps=6, learning_rate=2e-2)
    assert result.final_val_loss < result.initial_val_loss
    tensors = load_file(tmp_path / "final" / "adapter.safetensors")
    assert set(tensors) == {n for n, p in trained["model"].named_parameters() if p.requires_grad}
    config, loaded, spec = load_finetuned(stories_checkpoint, tmp_path / "final", torch.device("cpu"), torch.float32)
    assert spec.method == method
    idx = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = trained["model"].eval()(idx)  # unmerged, as trained
        assert rel_err(loaded(idx), expected) < 1e-5  # folded for inference: the same function
    # the residual recomputed from the checkpoint is the trained one, bit for bit: both fold to the same weights
    spec.definition.prepare_for_inference(trained["model"])
    assert all(torch.equal(v, trained["model"].state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("method", VARIANTS)
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, stories_checkpoint, instruction_data,
                                                                    monkeypatch, method):
    settings = methods.get_method(method).settings_cls(dropout=0.1)  # dropout: the RNG state must come back too
    check_exact_resume(tmp_path, stories_checkpoint, instruction_data, monkeypatch, method, settings, "adamw")


@pytest.mark.parametrize("method", ["dora", "rslora", "loraplus"])
def test_peft_loads_the_export_with_the_logits_of_our_run(tmp_path, tok512, method):
    from test_export import ids, make_base, make_run, rel_error
    from test_export_peft import peft_logits

    from lit_adapter.export import convert_to_hf, export_peft

    base = make_base(tmp_path / "base", tok512, "tiny-gqa")
    final, model = make_run(tmp_path / "run", base, method, dict(r=4, alpha=8, mlp=True))
    convert_to_hf(tmp_path / "hf", checkpoint_dir=base)
    out = tmp_path / "peft"
    export_peft(final, out, base_model_name_or_path=str(tmp_path / "hf"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"]) == (method == "dora", method == "rslora")
    if method == "dora":
        assert "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in load_file(
            out / "adapter_model.safetensors")
    idx = ids()
    with torch.no_grad():
        expected = model(idx)
    assert rel_error(peft_logits(tmp_path / "hf", out, idx), expected) < 1e-5


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_residual_variants_export_as_peft_converts_them_and_merge_exactly(tmp_path, tok512, method):
    """PEFT's ``convert_pissa_to_lora`` form: a plain rank-2r LoRA on the original base gives our logits in PEFT;
    the merge into a plain checkpoint recomputes the residual and gives them in transformers."""
    from test_export import hf_logits, ids, make_base, make_run, rel_error
    from test_export_peft import peft_logits

    from lit_adapter.export import convert_to_hf, export_peft

    base = make_base(tmp_path / "base", tok512, "tiny-gqa")
    final, model = make_run(tmp_path / "run", base, method, dict(r=4, alpha=8, mlp=True))
    idx = ids()
    with torch.no_grad():
        expected = model(idx)
    convert_to_hf(tmp_path / "hf_base", checkpoint_dir=base)
    export_peft(final, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "hf_base"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert rel_error(peft_logits(tmp_path / "hf_base", tmp_path / "peft", idx), expected) < 1e-5
    convert_to_hf(tmp_path / "hf", adapter_dir=final, merge_adapter=True)  # the fold recomputes the residual
    assert rel_error(hf_logits(tmp_path / "hf", idx), expected) < 1e-5


def test_the_training_loop_builds_loraplus_groups(tmp_path, stories_checkpoint, instruction_data, monkeypatch):
    from lit_adapter.train import trainer

    seen = []
    build = trainer.build_optimizer

    def spy(params, *args, **kwargs):
        seen.append([(len(g["params"]), g["lr"]) for g in params])
        return build(params, *args, **kwargs)

    monkeypatch.setattr(trainer, "build_optimizer", spy)  # what method_optimizer builds the run's optimizer with
    run(tmp_path, stories_checkpoint, instruction_data, method="loraplus", steps=2, learning_rate=1e-3)
    n_layers = Config.from_checkpoint_dir(stories_checkpoint).n_layer
    assert seen == [[(2 * n_layers, 1e-3), (2 * n_layers, 16e-3)]]  # A at lr, B at lr * lr_ratio (default 16)


@pytest.mark.parametrize("method, option, paper", [
    ("dora", "--dora.r", "Liu et al. 2024"), ("rslora", "--rslora.alpha", "Kalajdzievski 2023"),
    ("pissa", "--pissa.r", "Meng et al. 2024"), ("olora", "--olora.r", "Büyükakyüz 2024"),
    ("loraplus", "B's learning rate over A's", "Hayou et al. 2024")])
def test_help_names_the_paper_and_the_settings(capsys, method, option, paper):
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as lit_adapter.cli.finetune.cli does
    with pytest.raises(SystemExit):
        CLI(load_setup(method), args=["--help"], as_positional=False)
    text = capsys.readouterr().out
    assert option in text and paper in text


@pytest.mark.parametrize("method", ["rslora", "pissa", "olora", "loraplus", "dora"])
def test_saved_activations_match_autograd(method):
    """rsLoRA, PiSSA, OLoRA and LoRA+ compute LoRA's branch (another scale, other initial values), so LoRA's memory
    terms hold; DoRA declares what its magnitude's gradient keeps beside them."""
    from lit_adapter.memory import Cell, build_random_model, measure_saved_activations, saved_activations
    from test_memory import SMALL

    B, T = 2, 48
    cell = Cell(model_name=None, config_overrides={**SMALL, "n_query_groups": 2}, method=method,
                precision="32-true", seq_len=T, micro_batch_size=B)
    model = build_random_model(cell, torch.device("cpu")).train()
    measured = measure_saved_activations(model, torch.randint(0, 1000, (B, T)))
    predicted = saved_activations(cell.config(), cell.spec(), B, T, "32-true")
    assert measured["layers"] == predicted["layers"] and measured["head"] == predicted["head"]


def test_qdora_matches_peft_on_an_nf4_base():
    """QDoRA against PEFT's DoRA on bitsandbytes ``Linear4bit`` layers holding the same NF4 weights."""
    import bitsandbytes as bnb
    import peft

    from lit_adapter.model.quantize import quantize_linears

    torch.manual_seed(0)
    base = quantizable_base()
    settings = methods.get_method("dora").settings_cls(r=4, alpha=8, dropout=0.0)
    spec = MethodSpec("dora", settings, quantize="bnb.nf4")
    model = build_model(spec, base.config)
    model.load_state_dict(base.state_dict(), strict=False)
    quantize_linears(model, "bnb.nf4", device=torch.device("cpu"), skip=methods.unquantized(spec))
    spec.definition.initialize_after_quantization(model, settings)
    mark_trainable(model, spec)

    hf = hf_llama(base)
    for layer in hf.model.layers:  # the same block linears quantized the same way (the head stays float)
        for parent in (layer.self_attn, layer.mlp):
            for child, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.float32, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=False)  # as quantize_linears for nf4
                    q.support_avx512bf16_for_cpu = False
                    setattr(parent, child, q.to("cpu"))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                         target_modules=settings.target_names()))
    theirs = dict(peft_model.named_parameters())
    layers = variant_layers(model)
    for layer_name, layer in layers.items():  # B = 0 in both: m is the dequantized weights' norm, as PEFT's
        assert rel_err(layer.lora_magnitude_vector, theirs[peft_param_name(layer_name, "lora_magnitude_vector")]) < 1e-6
    with torch.no_grad():
        for layer_name, layer in layers.items():
            layer.lora_B.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))
            for tensor in trained_names(layer):
                theirs[peft_param_name(layer_name, tensor)].copy_(getattr(layer, tensor))
    idx = tokens(base.config)
    targets = torch.randint(0, base.config.vocab_size, idx.shape)
    ours, peft_out = model(idx), peft_model(input_ids=idx).logits
    assert rel_err(ours, peft_out) < 1e-5
    F.cross_entropy(ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(peft_out.flatten(0, 1), targets.flatten()).backward()
    for layer_name, layer in layers.items():
        for tensor in trained_names(layer):
            grad = getattr(layer, tensor).grad
            assert rel_err(grad, theirs[peft_param_name(layer_name, tensor)].grad) < 1e-5, (layer_name, tensor)
