"""MultiNLI for the classification head (seed 002): the hub ids through ``datasets`` with the matched and mismatched
splits scored by name, MultiNLI's own files, pairs encoded as RoBERTa encodes them and cut as transformers cuts
them (against ``RobertaTokenizerFast``), and the one-line refusals: a pair without its hypothesis, a label outside
the label set, a sequence past the window when the user chose to refuse it."""

import json
from pathlib import Path

import pytest

from lit_adapter.data.classification import ClassifyData, encode_examples, load_splits
from lit_adapter.errors import UserError
from lit_adapter.evaluation.labels import Example

NLI = ("entailment", "neutral", "contradiction")


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fake_mnli(n_train=30):
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(NLI)), "idx": datasets.Value("int32")})

    def rows(prefix, n, label):
        return datasets.Dataset.from_dict({"premise": [f"{prefix}p{i}" for i in range(n)],
                                           "hypothesis": [f"{prefix}h{i}" for i in range(n)],
                                           "label": [label(i) for i in range(n)], "idx": list(range(n))},
                                          features=features)

    return datasets.DatasetDict({  # nyu-mll/glue mnli's splits (its test splits have no labels: -1)
        "train": rows("t", n_train, lambda i: i % 3), "validation_matched": rows("m", 7, lambda i: i % 3),
        "validation_mismatched": rows("mm", 5, lambda i: 2), "test_matched": rows("x", 4, lambda i: -1),
        "test_mismatched": rows("y", 4, lambda i: -1)})


@pytest.mark.parametrize("source,config", [("nyu-mll/glue", "mnli"), ("nyu-mll/multi_nli", None)])
def test_mnli_from_the_hub_is_scored_on_matched_and_mismatched(monkeypatch, source, config):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: calls.append(args) or _fake_mnli())
    splits = load_splits(ClassifyData(source=source, hub_config=config, val_fraction=0.2), Path("."))
    assert calls == [(source, config)] and splits.labels == NLI
    tests = splits.test_sets()
    assert list(tests) == ["validation_matched", "validation_mismatched"]
    assert [len(t) for t in tests.values()] == [7, 5] and tests["validation_mismatched"][0].label == "contradiction"
    # best/ is chosen on a slice held out of train: no scored example selects the checkpoint
    assert (len(splits.train), len(splits.val)) == (24, 6)
    assert {e.fields[0][0] for e in splits.train + splits.val} == {"t"}
    capped = load_splits(ClassifyData(source=source, hub_config=config, max_eval_examples=3), Path("."))
    assert [len(t) for t in capped.test_sets().values()] == [3, 3]


def test_mnli_splits_can_be_named_and_glue_needs_its_task(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *args: _fake_mnli())
    data = ClassifyData(source="nyu-mll/multi_nli", val_split="validation_matched", test_split="validation_mismatched")
    splits = load_splits(data, Path("."))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 7, 5) and not splits.named_tests
    with pytest.raises(UserError, match="no example has a label"):
        load_splits(ClassifyData(source="nyu-mll/glue", hub_config="mnli", test_split="test_matched"), Path("."))
    with pytest.raises(UserError, match=r"has no split 'validation_matchd' \(it has train, "):
        load_splits(ClassifyData(source="nyu-mll/multi_nli", test_split="validation_matchd"), Path("."))
    with pytest.raises(UserError, match="nyu-mll/glue is a collection of tasks: pass --data.hub_config"):
        load_splits(ClassifyData(source="nyu-mll/glue"), Path("."))


def test_multinli_files_as_distributed(tmp_path):
    """MultiNLI's own folder: multinli_1.0_{train,dev_matched,dev_mismatched}.jsonl with sentence1/sentence2/
    gold_label, "-" (no gold label) skipped and counted; the validation that chooses best/ is held out of train."""
    def rows(n, tag):
        return [{"sentence1": f"{tag}{i}", "sentence2": "h", "gold_label": "-" if i == 0 else NLI[i % 3]}
                for i in range(n)]

    _write_jsonl(tmp_path / "multinli_1.0_train.jsonl", rows(21, "t"))
    _write_jsonl(tmp_path / "multinli_1.0_dev_matched.jsonl", rows(6, "m"))
    _write_jsonl(tmp_path / "multinli_1.0_dev_mismatched.jsonl", rows(4, "x"))
    splits = load_splits(ClassifyData(source=str(tmp_path)), tmp_path)
    assert {k: len(v) for k, v in splits.test_sets().items()} == {"validation_matched": 5, "validation_mismatched": 3}
    assert len(splits.train) + len(splits.val) == 20 and len(splits.val) == 2 and splits.skipped_no_gold == 3
    one = load_splits(ClassifyData(source=str(tmp_path), test_split="validation_mismatched"), tmp_path)
    assert list(one.test_sets()) == ["test"] and len(one.test) == 3 and one.test[0].fields[0] == "x1"
    with pytest.raises(UserError, match="no file for the test split 'test_matched'"):
        load_splits(ClassifyData(source=str(tmp_path), test_split="test_matched"), tmp_path)


def test_a_pair_without_its_hypothesis_is_one_line_naming_where(tmp_path):
    rows = [{"premise": "a", "hypothesis": "b", "label": 0}, {"premise": "c", "hypothesis": "d", "label": 1},
            {"premise": "e", "label": 2}]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError, match=r"pairs.jsonl, line 3: premise without a hypothesis"):
        load_splits(ClassifyData(source=str(path)), tmp_path)
    (tmp_path / "pairs.csv").write_text("premise,hypothesis,label\na,b,neutral\nc,,neutral\n")
    with pytest.raises(UserError, match=r"pairs.csv, line 3: premise without a hypothesis"):
        load_splits(ClassifyData(source=str(tmp_path / "pairs.csv")), tmp_path)
    # a pair dataset whose later record is a single text: no hypothesis to pair it with
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows[:2] + [{"text": "e", "label": 2}])
    with pytest.raises(UserError, match=r"mixed.jsonl, line 3: no hypothesis \(the dataset's earlier records"):
        load_splits(ClassifyData(source=str(path)), tmp_path)
    path = _write_jsonl(tmp_path / "mnli.jsonl", [{"sentence1": "a", "gold_label": "neutral"}])
    with pytest.raises(UserError, match=r"mnli.jsonl, line 1: sentence1 without a sentence2"):
        load_splits(ClassifyData(source=str(path)), tmp_path)


def test_a_label_outside_the_label_set_names_the_line_and_the_label(tmp_path):
    (tmp_path / "nli.tsv").write_text("premise\thypothesis\tlabel\na\tb\tentailment\nc\td\tmaybe\n")
    with pytest.raises(UserError, match=r"nli.tsv, line 3: label 'maybe' is not in the label set \['entailment', "
                                        r"'neutral', 'contradiction'\]"):
        load_splits(ClassifyData(source=str(tmp_path / "nli.tsv")), tmp_path)
    path = _write_jsonl(tmp_path / "nli.jsonl", [{"premise": "a", "hypothesis": "b", "label": 3}])
    with pytest.raises(UserError, match=r"nli.jsonl, line 1: label 3 is outside the label set"):
        load_splits(ClassifyData(source=str(path)), tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# pair encoding, against transformers' RobertaTokenizerFast on a tiny byte-level vocabulary


@pytest.fixture(scope="module")
def roberta_files(tmp_path_factory):
    """A tiny byte-level BPE vocabulary in RoBERTa's layout (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4), written
    as vocab.json + merges.txt (tests/family_fixtures.py)."""
    from family_fixtures import roberta_tokenizer_dir

    return roberta_tokenizer_dir(tmp_path_factory.mktemp("roberta_tok"))


@pytest.fixture(scope="module")
def hf_roberta(roberta_files):
    from transformers import RobertaTokenizerFast

    return RobertaTokenizerFast.from_pretrained(str(roberta_files))


@pytest.fixture(scope="module")
def roberta_tokenizer(roberta_files):
    from lit_adapter.data.tokenizer import Tokenizer

    return Tokenizer(roberta_files / "vocab.json")


PAIRS = [("The man inspects the uniform of a figure.", "The man is looking at something."),
         ("A soccer game with multiple males playing an anthem and then more.", "Some men are sleeping."),
         ("an", "the an the an the and the answer to the other thing"),
         ("Two texts of exactly equal length!", "Two texts of exactly equal length?")]


@pytest.mark.parametrize("max_len", [None, 40, 25, 12, 9])
def test_pairs_are_encoded_and_cut_as_transformers_does(roberta_tokenizer, hf_roberta, max_len):
    tokenizer = roberta_tokenizer
    examples = [Example(pair, "neutral", f"pairs.jsonl, line {i}") for i, pair in enumerate(PAIRS, 1)]
    encoded, cut = encode_examples(tokenizer, examples, max_len)
    kwargs = {"truncation": True, "max_length": max_len} if max_len else {}
    expected = [hf_roberta(a, b, **kwargs)["input_ids"] for a, b in PAIRS]
    assert [ids.tolist() for ids in encoded] == expected
    assert cut == sum(len(hf_roberta(a, b)["input_ids"]) > (max_len or 10**9) for a, b in PAIRS)
    first = expected[0]
    assert first[0] == 0 and first[-1] == 2 and [2, 2] == first[first.index(2): first.index(2) + 2]
    # a single text is <s> A </s>, as transformers encodes it
    single, _ = encode_examples(tokenizer, [Example((PAIRS[0][0],), "positive")], max_len)
    assert single[0].tolist() == hf_roberta(PAIRS[0][0], **kwargs)["input_ids"]


def test_a_sequence_past_the_window_is_refused_in_one_line_when_the_user_chose_so(roberta_tokenizer, hf_roberta):
    tokenizer = roberta_tokenizer
    examples = [Example(PAIRS[0], "neutral", "nli.jsonl, line 1"), Example(PAIRS[1], "neutral", "nli.jsonl, line 2")]
    n = len(hf_roberta(*PAIRS[1])["input_ids"])
    assert encode_examples(tokenizer, examples, n, "refuse")[1] == 0
    with pytest.raises(UserError, match=rf"^nli.jsonl, line 2: {n} tokens, past the model's {n - 1} positions; "
                                        "shorten it, or pass --data.truncation cut"):
        encode_examples(tokenizer, examples, n - 1, "refuse")
    with pytest.raises(UserError, match="data.truncation must be cut or refuse"):
        ClassifyData(truncation="drop")


# ----------------------------------------------------------------------------------------------------------------------
# the Llama 3 half: seed 002's zero- and one-shot prompts


def test_seed002_prompts_are_the_seeds_wording():
    from lit_adapter.evaluation.classification import SEED002_DEMONSTRATION, build_prompt

    query = Example(("A dog runs.", "An animal moves."), "entailment")
    zero = build_prompt("nli", [], query, "plain", prompt="seed002")
    assert zero == ("Premise: A dog runs.\nHypothesis: An animal moves.\n"
                    "Does the hypothesis follow from the premise? Answer (yes, no, maybe):")
    one = build_prompt("nli", [SEED002_DEMONSTRATION], query, "plain", prompt="seed002")
    assert one == ("Premise: A man inspects the uniform of a figure in some East Asian country.\n"
                   "Hypothesis: The man is looking at something.\n"
                   "Does the hypothesis follow from the premise? Answer (yes, no, maybe): yes\n\n" + zero)


def test_seed002_answers_map_to_labels_and_unparsed_ones_count_as_no_answer(shared_data):
    from test_classification import ScriptedModel

    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.evaluation.classification import evaluate_classification

    tokenizer = Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")
    examples = [Example((f"P{i}.", f"H{i}."), NLI[i % 3]) for i in range(30)]
    gold = {e.fields[0]: e.label for e in examples}
    # right for i % 5 == 0, a wrong label for i % 5 == 1, no label at all otherwise
    wrong = {"entailment": "No.", "neutral": "Yes", "contradiction": " maybe"}
    right = {"entailment": " Yes, it does.", "neutral": " maybe", "contradiction": " no"}

    def respond(prompt):
        premise = prompt.rsplit("Premise: ", 1)[1].split("\n")[0]
        i = int(premise[1:-1])
        return right[gold[premise]] if i % 5 == 0 else wrong[gold[premise]] if i % 5 == 1 else " The hypothesis"

    for shots in (0, 1):
        model = ScriptedModel(tokenizer, respond)
        result, records = evaluate_classification(model, tokenizer, "nli", examples, shots=shots, prompt="seed002")
        assert result.examples == 30  # every example is evaluated: the seed's demonstration is its own
        assert (result.correct, result.no_answer) == (6, 18) and result.accuracy == pytest.approx(0.2)
        assert sum(c["none"] for c in result.per_label.values()) == 18  # no answer is wrong, counted, not dropped
        assert all(p.count("Answer (yes, no, maybe):") == 1 + shots for p in model.prompts)
        assert ("East Asian" in model.prompts[0]) == (shots == 1)
    with pytest.raises(UserError, match="--prompt seed002 is seed 002's NLI question, zero- or one-shot"):
        evaluate_classification(model, tokenizer, "nli", examples, shots=2, prompt="seed002")
    with pytest.raises(UserError, match="--prompt seed002"):
        evaluate_classification(model, tokenizer, "sentiment", [], prompt="seed002")


def test_seed002_one_shot_on_a_real_model(stories260k, tmp_path):
    from lit_adapter.evaluation.classification import run_classification

    nli = _write_jsonl(tmp_path / "nli.jsonl", [{"premise": f"Tim saw a dog {i}.", "hypothesis": "Tim saw an animal.",
                                                  "label": NLI[i % 3]} for i in range(6)])
    report = run_classification(stories260k, task="nli", nli_file=nli, shots=1, prompt="seed002", max_examples=3,
                                max_new_tokens=4, device="cpu", out_file=tmp_path / "icl.json")
    assert report["prompt"] == "seed002" and report["examples"] == 3 and len(report["answers"]) == 3
    assert report["correct"] + report["no_answer"] <= 3 and json.loads((tmp_path / "icl.json").read_text())


# ----------------------------------------------------------------------------------------------------------------------
# the study's file


def test_the_study_checks_every_cell_against_classify_before_running(tmp_path):
    import yaml

    from lit_adapter.grid.head_study import check_study, load_study
    from lit_adapter.grid.spec import expand
    from lit_adapter.model.config import Config

    repo = Path(__file__).resolve().parents[1]
    study = yaml.safe_load((repo / "configs" / "roberta_mnli_study.yaml").read_text())
    study["runs"][1]["args"]["lora"]["rank"] = 8
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    settings, grid = load_study(config)
    assert settings.objective == "head" and [c.run.script for c in expand(grid)] == ["full", "lora", "p_tuning"]
    with pytest.raises(UserError, match=r"^cell lora/bf16mix/s1337: unknown option lora.rank \(did you mean "
                                        r"lora.r\?\) for finetune/classify.py lora$"):
        check_study(grid, expand(grid), Config.from_name("roberta-large"))
    study["data"] = {"source": "x"}
    config.write_text(yaml.safe_dump(study))
    with pytest.raises(UserError, match="a head study prepares no data"):
        load_study(config)
