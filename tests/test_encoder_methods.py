"""The methods on the encoder (RoBERTa): every method that makes sense on it trains a tiny random RoBERTa with its
classification head; LoRA (every linear) and P-tuning (MLP and LSTM encoders) equal HF PEFT's
``PeftModelForSequenceClassification`` on the same weights, logits and gradients (fp32, 1e-5); the decoder-only
methods refuse in one line; and ``--dry_run`` on ``roberta-large`` counts what PEFT counts at seed 002's settings."""

from __future__ import annotations

import copy
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from family_fixtures import roberta_tokenizer_dir
from lit_adapter.convert import convert_hf_checkpoint
from lit_adapter.errors import UserError
from lit_adapter.model.config import Config
from lit_adapter.model.heads import HeadSpec, classification_logits
from lit_adapter.tuners.registry import MethodSpec, prepare_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
VOCAB, PAD, LABELS = 400, 1, ("entailment", "neutral", "contradiction")
EVERY_LINEAR = dict(query=True, key=True, value=True, projection=True, mlp=True)
# our layer -> HF RoBERTa's module under roberta.encoder.layer.{i}
HF_LAYER = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
            "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
            "mlp.up_proj": "intermediate.dense", "mlp.down_proj": "output.dense"}
ENCODER_METHODS = ["full", "lora", "dora", "rslora", "p_tuning", "prompt_tuning", "prefix_tuning", "ia3", "bitfit",
                   "houlsby", "pfeiffer"]


def roberta_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=66, type_vocab_size=1, pad_token_id=PAD, num_labels=len(LABELS),
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.RobertaConfig(**dict(fields, **overrides))


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(1)
    return transformers.RobertaForSequenceClassification(roberta_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(hf_classifier, tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("hf_roberta")
    hf_classifier.save_pretrained(source)
    roberta_tokenizer_dir(source)
    out = tmp_path_factory.mktemp("lit_roberta")
    convert_hf_checkpoint(source, out)
    return out


def ours(method: str, settings, checkpoint: Path):
    config = Config.from_checkpoint_dir(checkpoint)
    spec = MethodSpec(method, settings, head=HeadSpec(labels=LABELS, pad_id=PAD))
    spec.validate(config)
    torch.manual_seed(0)
    return prepare_model(spec, config, checkpoint, torch.device("cpu"), torch.float32)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (3, 13), generator=g)
    ids[:, 0] = 0
    for row, length in enumerate((13, 9, 5)):
        ids[row, length - 1] = 2
        ids[row, length:] = PAD
    return ids, torch.tensor([0, 2, 1])


def peft_name(name: str, prompt: bool) -> str:
    """PEFT's name of our trainable tensor ``name`` (LoRA's factors, the prompt encoder's, the head's copy)."""
    if name.startswith("score."):
        prefix = "base_model." if prompt else "base_model.model."
        return prefix + "classifier.modules_to_save.default." + name[len("score."):]
    if name.startswith("virtual_tokens."):
        rest = name[len("virtual_tokens."):]
        return "prompt_encoder.default." + ("embedding.weight" if rest == "embedding" else rest)
    layer, module, tensor = re.fullmatch(r"transformer\.h\.(\d+)\.(\w+\.\w+)\.(lora_[AB])", name).groups()
    return f"base_model.model.roberta.encoder.layer.{layer}.{HF_LAYER[module]}.{tensor}.default.weight"


def compare(model, oracle, prompt: bool) -> None:
    """Our trained tensors into PEFT's, then logits on a padded batch and every gradient, fp32, 1e-5."""
    theirs = {n: p for n, p in oracle.named_parameters() if p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in trained.items():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)  # B starts at 0: make the update (and A's gradient) non-zero
            theirs[peft_name(name, prompt)].copy_(param)
    assert {peft_name(n, prompt) for n in trained} == set(theirs)
    ids, labels = batch()
    model.train(), oracle.train()  # dropouts are 0: train mode is what the loop runs
    logits = classification_logits(model, ids, PAD)
    reference = oracle(input_ids=ids, attention_mask=ids.ne(PAD)).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    F.cross_entropy(logits, labels).backward()
    F.cross_entropy(reference, labels).backward()
    for name, param in trained.items():
        torch.testing.assert_close(param.grad, theirs[peft_name(name, prompt)].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_lora_on_every_linear_equals_peft(hf_classifier, checkpoint):
    model = ours("lora", dict(r=4, alpha=8, dropout=0.0, **EVERY_LINEAR), checkpoint)
    oracle = peft.get_peft_model(copy.deepcopy(hf_classifier), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    compare(model, oracle, prompt=False)


@pytest.mark.parametrize("encoder, layers", [("mlp", 2), ("lstm", 2), ("lstm", 1)])
def test_p_tuning_equals_peft(hf_classifier, checkpoint, encoder, layers):
    """PEFT prepends the prompt to ``inputs_embeds`` and RoBERTa's head reads the first row: the first virtual
    token's. Our encoder does the same (lit_adapter.model.encoder)."""
    settings = dict(num_virtual_tokens=5, encoder=encoder, encoder_hidden_size=16, encoder_num_layers=layers)
    model = ours("p_tuning", settings, checkpoint)
    oracle = peft.get_peft_model(copy.deepcopy(hf_classifier), peft.PromptEncoderConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5, encoder_reparameterization_type=encoder.upper(),
        encoder_hidden_size=16, encoder_num_layers=layers))
    compare(model, oracle, prompt=True)


def test_prompt_tuning_equals_peft(hf_classifier, checkpoint):
    model = ours("prompt_tuning", dict(num_virtual_tokens=5), checkpoint)
    oracle = peft.get_peft_model(copy.deepcopy(hf_classifier), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5))
    compare(model, oracle, prompt=True)


@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_every_encoder_method_trains_with_the_head(checkpoint, method):
    settings = EVERY_LINEAR if method in ("lora", "dora", "rslora") else None
    model = ours(method, settings, checkpoint)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("score.") for n in trainable) and len(trainable) > 4, method
    ids, labels = batch()
    model.train()
    logits = classification_logits(model, ids, PAD)
    assert logits.shape == (3, len(LABELS)) and torch.isfinite(logits).all()
    F.cross_entropy(logits, labels).backward()
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("method", ["adapter", "adapter_v2"])
def test_decoder_only_methods_refuse_in_one_line(method):
    with pytest.raises(UserError, match=f"{method} cannot run on the encoder tiny-roberta: it is decoder-only") as err:
        MethodSpec(method).validate(Config.from_name("tiny-roberta"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="causal pattern"):
        MethodSpec("lora", attention={"pattern": "local"}).validate(Config.from_name("tiny-roberta"))


# ----------------------------------------------------------------------------------------------------------------------
# roberta-large: --dry_run counts against PEFT's on a meta-device RobertaForSequenceClassification


def roberta_large_peft(peft_config):
    config = transformers.RobertaConfig(  # roberta-large's config.json
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5, num_labels=3)
    with torch.device("meta"):
        model = transformers.RobertaForSequenceClassification(config)
        return model, peft.get_peft_model(model, peft_config) if peft_config is not None else model


def dry_run(capsys, method, *args) -> int:
    capsys.readouterr()
    argv = sys.argv
    sys.argv = [str(REPO / "finetune/classify.py"), method, "--model_name", "roberta-large", "--dry_run", "true",
                "--data.labels", "[entailment, neutral, contradiction]", *args]
    try:
        runpy.run_path(str(REPO / "finetune/classify.py"), run_name="__main__")
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    return int(re.search(r"trainable parameters: (\d+)", out).group(1))


def test_roberta_large_dry_run_counts_equal_peft(capsys):
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear")
    _, oracle = roberta_large_peft(lora)
    expected = oracle.get_nb_trainable_parameters()[0]  # LoRA on 6 linears x 24 layers + the classifier
    assert dry_run(capsys, "lora", "--lora.r", "8", "--lora.alpha", "16", "--lora.dropout", "0.1",
                   *[f"--lora.{k}=true" for k in EVERY_LINEAR]) == expected == 4_591_619

    p_tuning = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=20, encoder_hidden_size=128)
    _, oracle = roberta_large_peft(p_tuning)
    expected = oracle.get_nb_trainable_parameters()[0]  # the prompt encoder + the classifier
    assert dry_run(capsys, "p_tuning", "--p_tuning.num_virtual_tokens", "20",
                   "--p_tuning.encoder_hidden_size", "128") == expected

    model, _ = roberta_large_peft(None)  # full fine-tuning trains every tensor of the HF model
    assert dry_run(capsys, "full") == sum(p.numel() for p in model.parameters()) == 355_362_819


def test_past_the_512_positions_is_one_line(capsys):
    argv = sys.argv
    sys.argv = [str(REPO / "finetune/classify.py"), "p_tuning", "--model_name", "roberta-large", "--dry_run", "true",
                "--data.max_seq_length", "500"]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / "finetune/classify.py"), run_name="__main__")
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip()
    assert exit_.value.code and "\n" not in err, err
    assert "--data.max_seq_length (plus 20 virtual tokens)=520 exceeds the model's 512 learned positions" in err
