"""The encoder family (RoBERTa, BERT) against HF transformers: converted random models give HF's hidden states and
classification logits with padding in the batch (fp32, 1e-5), and the RoBERTa tokenizer gives
``RobertaTokenizerFast``'s ids for single texts and pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from family_fixtures import TRICKY, roberta_tokenizer_dir
from lit_adapter.checkpoint import find_weights, load_state_dict, load_weights_into
from lit_adapter.convert import convert_hf_checkpoint
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.errors import UserError
from lit_adapter.model.config import Config
from lit_adapter.model.gpt import GPT
from lit_adapter.model.heads import HeadSpec, attach_head, classification_logits

transformers = pytest.importorskip("transformers")

VOCAB, PAD, LABELS = 400, 1, ("entailment", "neutral", "contradiction")


def hf_config(model_type: str = "roberta", **overrides):
    cls = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64 + (PAD + 1 if model_type == "roberta" else 0),
                  type_vocab_size=1 if model_type == "roberta" else 2, pad_token_id=PAD if model_type == "roberta"
                  else 0, num_labels=len(LABELS), attn_implementation="eager")
    return cls(**dict(fields, **overrides))


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    roberta_tokenizer_dir(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return roberta_tokenizer_dir(tmp_path_factory.mktemp("roberta_tok"), files="both")


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(1)
    return transformers.RobertaForSequenceClassification(hf_config()).eval()


@pytest.fixture(scope="module")
def converted_classifier(hf_classifier, tmp_path_factory) -> Path:
    source = save_hf(hf_classifier, tmp_path_factory.mktemp("hf_roberta_cls"))
    out = tmp_path_factory.mktemp("lit_roberta_cls")
    convert_hf_checkpoint(source, out)
    return out


def load_with_head(folder: Path, labels=LABELS) -> GPT:
    config = Config.from_checkpoint_dir(folder)
    with torch.device("meta"):
        model = GPT(config)
        attach_head(model, HeadSpec(labels=labels, pad_id=config.pad_token_id))
    load_weights_into(model, load_state_dict(find_weights(folder)))
    return model.eval()


def padded_batch(pad: int = PAD) -> torch.Tensor:
    """Three rows of different lengths, right-padded: <s> ... </s> then padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (3, 17), generator=g)
    ids[:, 0] = 0
    for row, length in enumerate((17, 11, 6)):
        ids[row, length - 1] = 2
        ids[row, length:] = pad
    return ids


def test_roberta_classifier_logits_equal_hf(hf_classifier, converted_classifier):
    config = Config.from_checkpoint_dir(converted_classifier)
    assert not config.causal and config.block_size == 64 and config.position_rows == 66
    model = load_with_head(converted_classifier)
    ids = padded_batch()
    with torch.no_grad():
        ours = classification_logits(model, ids, PAD)
        theirs = hf_classifier(input_ids=ids, attention_mask=ids.ne(PAD)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_roberta_model_hidden_states_equal_hf(tmp_path):
    torch.manual_seed(2)
    hf = transformers.RobertaModel(hf_config()).eval()
    out = tmp_path / "lit"
    convert_hf_checkpoint(save_hf(hf, tmp_path / "hf"), out)  # its pooler is dropped: no head of ours reads it
    config = Config.from_checkpoint_dir(out)
    with torch.device("meta"):
        model = GPT(config)
    load_weights_into(model, load_state_dict(find_weights(out)))
    model.eval()
    ids = padded_batch()
    with torch.no_grad():
        ours = model(ids, return_hidden=True)
        theirs = hf(input_ids=ids, attention_mask=ids.ne(PAD)).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # padded rows included: same positions as HF


def test_bert_classifier_logits_equal_hf(tmp_path):
    """BERT comes almost free: absolute positions, two token types, its pooler + classifier as the head."""
    torch.manual_seed(3)
    hf = transformers.BertForSequenceClassification(hf_config("bert")).eval()
    hf.save_pretrained(tmp_path / "hf")
    roberta_tokenizer_dir(tmp_path / "hf")  # any vocabulary of the right size: the weights are what is compared
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    model = load_with_head(tmp_path / "lit")
    ids = padded_batch(pad=0)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        pooled = model(ids, return_hidden="first", token_type_ids=types)
        ours = model.score(pooled)
        theirs = hf(input_ids=ids, attention_mask=ids.ne(0), token_type_ids=types).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("files", ["vocab.json", "tokenizer.json"])
def test_roberta_tokenizer_equals_hf(tokenizer_dir, tmp_path, files):
    folder = tmp_path / "tok"
    folder.mkdir()
    names = ("vocab.json", "merges.txt") if files == "vocab.json" else ("tokenizer.json",)
    for name in names:
        shutil.copy(tokenizer_dir / name, folder / name)
    ours = Tokenizer(folder)
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir) if files == "tokenizer.json" else \
        transformers.RobertaTokenizerFast.from_pretrained(folder)
    assert (ours.bos_id, ours.pad_id, ours.eos_id) == (0, 1, 2) and ours.vocab_size == len(hf)
    texts = [t for t in TRICKY if t.strip()]
    for text in texts:
        ids, types = ours.encode_pair(text)
        assert ids.tolist() == hf(text)["input_ids"], text
        assert types.tolist() == [0] * len(ids)
        assert ours.encode(text, bos=True, eos=True).tolist() == hf(text)["input_ids"]
    for a, b in zip(texts, reversed(texts)):
        ids, types = ours.encode_pair(a, b)
        assert ids.tolist() == hf(a, b)["input_ids"], (a, b)  # <s> A </s></s> B </s>
        assert types.tolist() == [0] * len(ids)
        cut, _ = ours.encode_pair(a, b, max_length=12)
        assert cut.tolist() == hf(a, b, truncation=True, max_length=12)["input_ids"], (a, b)


def test_pairs_without_a_template_are_one_line(tmp_path):
    from family_fixtures import gpt2_tokenizer_dir

    with pytest.raises(UserError, match="no template for text pairs"):
        Tokenizer(gpt2_tokenizer_dir(tmp_path / "gpt2", files="vocab")).encode_pair("a", "b")


def test_named_configs_and_the_512_positions():
    large = Config.from_name("roberta-large")
    assert (large.n_layer, large.n_embd, large.position_rows, large.causal) == (24, 1024, 514, False)
    with torch.device("meta"):
        model = GPT(large)
    assert model.lm_head is None and model.transformer.wpe.weight.shape == (514, 1024)
    tiny = GPT(Config.from_name("tiny-roberta"))
    with pytest.raises(UserError, match="exceeds") as err:
        tiny(torch.full((1, 65), 5))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no language-model head"):
        tiny(torch.full((1, 8), 5))
    with pytest.raises(UserError, match="neither decodes"):
        tiny(torch.full((1, 8), 5), input_pos=torch.arange(8))


def test_head_pad_id_must_be_the_encoders(tmp_path):
    with torch.device("meta"):
        model = GPT(Config.from_name("tiny-roberta"))
    with pytest.raises(UserError, match="padding token 1"):
        attach_head(model, HeadSpec(labels=LABELS, pad_id=0))


def test_activation_checkpointing_gives_the_same_gradients():
    """The padding mask reaches a recomputed block (it is an argument, never state left from another forward)."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-roberta"))
    model.init_weights()
    attach_head(model, HeadSpec(labels=LABELS, pad_id=PAD))
    model.score.dense.reset_parameters(), model.score.out_proj.reset_parameters()
    model.train()
    ids = padded_batch()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        classification_logits(model, ids, PAD).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def test_hf_and_peft_export_refuse_an_encoder():
    from lit_adapter.convert.to_hf import hf_config

    with pytest.raises(UserError, match="encoder"):
        hf_config(Config.from_name("tiny-roberta"), torch.float32)
    assert not Config.from_name("tiny-roberta", position_embedding="learned").causal  # BERT-like: never "GPT-2"
    from lit_adapter.convert.gpt2 import is_gpt2

    assert not is_gpt2(Config.from_name("tiny-roberta", position_embedding="learned"))


@pytest.mark.parametrize("name, hf_fields", [
    ("roberta-base", dict(model_type="roberta")),
    ("roberta-large", dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096)),
    ("bert-base-uncased", dict(model_type="bert")),
])
def test_named_sizes_equal_hf_classifiers(name, hf_fields):
    """The named configs have the published shapes: as many parameters as HF's sequence classifier of that size."""
    model_type = hf_fields.pop("model_type")
    if model_type == "roberta":
        hf = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                        pad_token_id=1, num_labels=3, **hf_fields)
        cls = transformers.RobertaForSequenceClassification
    else:
        hf, cls = transformers.BertConfig(num_labels=3), transformers.BertForSequenceClassification
    with torch.device("meta"):
        theirs = cls(hf)
        ours = GPT(Config.from_name(name))
        attach_head(ours, HeadSpec(labels=LABELS, pad_id=ours.config.pad_token_id))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
