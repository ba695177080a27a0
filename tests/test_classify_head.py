"""The sequence-classification head: HF LlamaForSequenceClassification's logits on converted weights, the head with
every method of the registry (trained, saved and reloaded with the method's tensors; QLoRA's NF4 base), accuracy /
macro-F1 / confusion against scikit-learn, the data sources, one-line refusals, and a real run on stories260K."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.tuners import registry as methods
from lit_adapter.train.classification import (
    ClassificationObjective, HeadArgs, confusion_matrix, evaluate_head, finetune_classifier, scores,
    tokenize_examples,
)
from lit_adapter.data.classification import ClassifyData, load_splits
from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_state_dict
from lit_adapter.errors import UserError
from lit_adapter.model.heads import HeadSpec, attach_head, classification_logits, last_token_index
from lit_adapter.tuners.registry import METHODS, MethodSpec
from lit_adapter.model.gpt import GPT
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.train.run import EvalArgs, FabricArgs, LoggerArgs, TrainArgs

REPO = Path(__file__).resolve().parents[1]


def _hf_classifier(model: GPT, num_labels: int, pad_id: int):
    import transformers

    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        num_labels=num_labels, pad_token_id=pad_id, attn_implementation="eager",
    )
    hf = transformers.LlamaForSequenceClassification(hf_config)
    base = {k: v for k, v in model.state_dict().items() if k not in ("lm_head.weight", "score.weight")}
    state = {k: v for k, v in lit_to_hf_state_dict(base).items()}
    state["score.weight"] = model.score.weight
    hf.load_state_dict(state, strict=True)
    return hf.eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_logits_and_gradients_match_hf_sequence_classification(name):
    torch.manual_seed(0)
    model = GPT(Config.from_name(name))
    model.init_weights()
    attach_head(model, HeadSpec(labels=("a", "b", "c"), pad_id=0))
    model.score.reset_parameters()
    hf = _hf_classifier(model, 3, pad_id=0)
    idx = torch.randint(1, model.config.vocab_size, (4, 11))
    idx[0, 7:] = 0  # right padding
    idx[1, :3] = 0  # left padding
    idx[2, 4] = 0  # a pad-id token inside the text does not end it
    ours = classification_logits(model, idx, pad_id=0)
    theirs = hf(input_ids=idx).logits
    assert ours.shape == (4, 3)
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert last_token_index(idx, 0).tolist() == [6, 10, 10, 10]
    ours.square().sum().backward()
    theirs.square().sum().backward()
    hf_params = dict(hf.named_parameters())
    for lit_name, hf_name in (("score.weight", "score.weight"),
                              ("transformer.h.0.attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight")):
        ours_grad, theirs_grad = dict(model.named_parameters())[lit_name].grad, hf_params[hf_name].grad
        assert ((ours_grad - theirs_grad).abs().max() / theirs_grad.abs().max()) < 1e-4, lit_name


def test_an_unknown_pad_token_is_refused():
    with pytest.raises(UserError, match="pad token"):
        HeadSpec(labels=("negative", "positive"), pad_id=None)
    with pytest.raises(UserError, match="two labels"):
        HeadSpec(labels=("only",), pad_id=0)


@pytest.mark.parametrize("method", METHODS)
def test_the_head_trains_and_is_saved_with_every_method(method, stories260k, tmp_path):
    head = HeadSpec(labels=("negative", "positive"), pad_id=0)
    spec = MethodSpec(method, head=head)
    config = Config.from_checkpoint_dir(stories260k)
    model = methods.prepare_model(spec, config, stories260k, torch.device("cpu"), torch.float32)
    assert model.score.weight.requires_grad and 0 < model.score.weight.std() < 0.05  # N(0, 0.02), not loaded
    objective = ClassificationObjective([], [], {}, head)
    objective.attach(model, spec, "cross_entropy")
    batch = objective.collate([{"input_ids": torch.tensor([1, 50, 60, 70]), "label": 1},
                               {"input_ids": torch.tensor([1, 80]), "label": 0}], pad_id=0)
    loss, n = objective.forward_loss(model, batch)
    loss.backward()
    assert n == 2 and model.score.weight.grad.abs().sum() > 0
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and len(trained) > 1  # the head and the method's own tensors
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trained)
    with torch.no_grad():
        model.score.weight.add_(0.5)  # a trained head: the reload must bring exactly this one back
        expected = classification_logits(model.eval(), batch["input_ids"], 0)
    methods.save_adapter(model, spec, config, stories260k, tmp_path / "final")
    _, reloaded, read = methods.load_finetuned(stories260k, tmp_path / "final", torch.device("cpu"), torch.float32)
    assert read.head == head
    assert torch.allclose(classification_logits(reloaded, batch["input_ids"], 0), expected, atol=1e-5)


def test_qlora_leaves_the_head_in_floating_point(stories260k):
    import bitsandbytes as bnb

    spec = MethodSpec("lora", quantize="bnb.nf4", head=HeadSpec(labels=("a", "b", "c"), pad_id=0))
    model = methods.prepare_model(spec, Config.from_checkpoint_dir(stories260k), stories260k, torch.device("cpu"),
                                  torch.float32)
    assert isinstance(model.transformer.h[0].attn.q_proj.linear, bnb.nn.Linear4bit)
    assert model.score.weight.dtype == torch.float32 and model.score.weight.requires_grad
    logits = classification_logits(model, torch.tensor([[1, 40, 41, 0]]), 0)
    logits.sum().backward()
    assert model.score.weight.grad is not None and model.transformer.h[0].attn.q_proj.lora_B.grad is not None


def test_scores_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix as sk_confusion, f1_score

    g = torch.Generator().manual_seed(3)
    gold = torch.randint(0, 4, (200,), generator=g)
    # label 3 is never predicted (recall 0), label 4 neither present nor predicted (every ratio 0 by zero_division)
    predicted = torch.where(torch.rand(200, generator=g) < 0.6, gold, torch.randint(0, 3, (200,), generator=g))
    predicted = predicted.clamp(max=2)
    labels = [0, 1, 2, 3, 4]
    confusion = confusion_matrix(gold, predicted, 5)
    assert confusion.tolist() == sk_confusion(gold, predicted, labels=labels).tolist()
    result = scores(confusion, ["a", "b", "c", "d", "e"])
    assert result["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
    expected = f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
    assert result["macro_f1"] == pytest.approx(expected, abs=1e-12)
    assert result["per_label"]["d"]["f1"] == 0.0 and result["per_label"]["e"]["support"] == 0


def test_rotten_tomatoes_split(shared_data):
    splits = load_splits(ClassifyData(data_dir=shared_data), shared_data)
    assert splits.labels == ("negative", "positive")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8530, 1066, 1066)
    train, val, test = ({e.fields for e in part} for part in (splits.train, splits.val, splits.test))
    assert not (train & test) and not (train & val) and not (val & test)


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_premise_hypothesis_files_and_folders(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["entailment", 1, "2", "-1"][i % 4]}
            for i in range(40)]
    splits = load_splits(ClassifyData(source=str(_write_jsonl(tmp_path / "nli.jsonl", rows))), tmp_path)
    assert splits.labels == ("entailment", "neutral", "contradiction") and splits.skipped_no_gold == 10
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30
    assert {e.label for e in splits.train} <= set(splits.labels)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence1\tsentence2\tgold_label\n" + "a\tb\tneutral\n" * 6)
    _write_jsonl(folder / "dev.jsonl", [{"sentence1": "c", "sentence2": "d", "gold_label": "contradiction"}])
    splits = load_splits(ClassifyData(source=str(folder)), tmp_path)
    assert (len(splits.train), len(splits.val)) == (6, 1) and splits.test_is_validation and splits.test == splits.val


def test_a_label_outside_the_label_set_is_one_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": "positive"}, {"text": "meh", "label": "ok"}])
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: label 'ok' is not in the label set"):
        load_splits(ClassifyData(source=str(path)), tmp_path)
    path = _write_jsonl(tmp_path / "index.jsonl", [{"text": "fine", "label": 7}])
    with pytest.raises(UserError, match=r"line 1: label 7 is outside the label set"):
        load_splits(ClassifyData(source=str(path)), tmp_path)


def test_a_hub_dataset_through_datasets(monkeypatch):
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    rows = lambda n, label: {"premise": [f"p{i}" for i in range(n)], "hypothesis": ["h"] * n,  # noqa: E731
                             "label": [label(i) for i in range(n)]}
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(20, lambda i: i % 3), features=features),
        "validation_matched": datasets.Dataset.from_dict(rows(6, lambda i: 2), features=features),
        "test": datasets.Dataset.from_dict(rows(4, lambda i: -1), features=features),
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: calls.append(args) or fake)
    data = ClassifyData(source="nyu-mll/multi_nli", val_split="validation_matched", test_split="test")
    with pytest.raises(UserError, match="no example has a label"):
        load_splits(data, Path("."))
    data.test_split = "validation_matched"
    splits = load_splits(data, Path("."))
    assert calls[0] == ("nyu-mll/multi_nli", None)
    assert splits.labels == ("entailment", "neutral", "contradiction")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 6, 6)
    assert splits.train[1].label == "neutral" and splits.val[0].fields == ("p0", "h")


def _train_args(**kw):
    return TrainArgs(global_batch_size=8, micro_batch_size=8, max_steps=2, warmup_steps=1, learning_rate=1e-2,
                     seed=3, **kw)


def test_a_real_run_reports_the_best_checkpoint_on_the_test_split(stories260k, shared_data, tmp_path):
    data = ClassifyData(data_dir=shared_data, max_train_examples=16, max_eval_examples=16, max_seq_length=48)
    result, report = finetune_classifier(
        MethodSpec("lora"), checkpoint_dir=stories260k, model_name=None, out_dir=tmp_path / "run", data=data,
        head=HeadArgs(pad_id=0), train=_train_args(), eval=EvalArgs(interval=1, initial=False),
        fabric_args=FabricArgs(accelerator="cpu", precision="32-true"), logger=LoggerArgs())
    assert result.status == "completed" and result.best_val_step in (1, 2)
    # the seeded run's per-step losses, pinned (a change to the head, the objective or the loop shows up here)
    assert [loss for _, loss in result.train_losses] == pytest.approx([0.691734, 0.8737], abs=2e-5)
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert saved["checkpoint"].endswith("best") and saved["examples"] == 16
    assert sum(map(sum, saved["confusion"])) == 16 and 0 <= saved["macro_f1"] <= saved["accuracy"] + 1e-9 <= 1
    logged = (tmp_path / "run" / "logs").rglob("metrics.csv")
    header = next(logged).read_text().splitlines()[0]
    assert "val_accuracy" in header and "val_macro_f1" in header
    # the report's numbers are those of best/ itself, reloaded
    tokenizer = Tokenizer.from_checkpoint_dir(stories260k)
    splits = load_splits(data, shared_data)
    test = tokenize_examples(tokenizer, splits.test, splits.labels)
    _, model, spec = methods.load_finetuned(stories260k, tmp_path / "run" / "best", torch.device("cpu"), torch.float32)
    confusion, _ = evaluate_head(model, test, spec.head, max_len=48)
    assert confusion.tolist() == saved["confusion"]


def test_the_command_refuses_a_missing_pad_token_in_one_line(stories260k, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "classify.py"), "lora", "--checkpoint_dir", str(stories260k),
         "--out_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: a classification head needs the pad token") and "Traceback" not in proc.stderr
