"""Instruction data: prompt template, record loading, split, tokenization/masking, truncation, cache, collate."""

import json
import re
from pathlib import Path

import pytest
import torch

from lit_adapter.data import instructions as data_module
from lit_adapter.data.instructions import (
    IGNORE_INDEX,
    InstructionDataset,
    InstructionRecord,
    collate_instructions,
    load_prepared,
    load_records,
    min_seq_length,
    prepare,
    split_records,
    synthetic_instructions,
    tokenize_record,
)
from lit_adapter.errors import UserError
from lit_adapter.data.prompts import extract_response, generate_prompt
from lit_adapter.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer_path(shared_data):
    return shared_data / "tokenizers" / "llama" / "tokenizer.model"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def dolly_dir(shared_data):
    return shared_data / "dolly"


@pytest.fixture(scope="module")
def dolly(dolly_dir):
    records, skipped = load_records(dolly_dir)
    assert skipped == 0
    return records


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _quiet(**kwargs):
    return dict(progress=False, log=lambda _: None, **kwargs)


# ---------------------------------------------------------------------------------------------------------- prompt


def test_generate_prompt_matches_alpaca_template():
    with_input = generate_prompt(InstructionRecord("Sum the numbers.", "1, 2", "3"))
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum the numbers.\n\n### Input:\n1, 2\n\n### Response:\n"
    )
    without_input = generate_prompt(InstructionRecord("Name a color.", "", "red"))
    assert without_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    # whitespace-only input means "no input"; Dolly dicts use "context"; the output never enters the prompt
    assert generate_prompt(InstructionRecord("Name a color.", " \n", "x")) == without_input
    assert generate_prompt({"instruction": "Sum the numbers.", "context": "1, 2", "response": "3"}) == with_input
    assert extract_response(with_input + " 3 ") == "3"


# --------------------------------------------------------------------------------------------------------- loading


def test_load_all_dolly_records(dolly, dolly_dir):
    assert len(dolly) == 15_011
    # independent reference: json.load each file in sorted order, Dolly fields -> (instruction, input, output)
    expected = [
        InstructionRecord(r["instruction"], r["context"], r["response"], r["category"])
        for f in sorted(dolly_dir.glob("*.json"))
        for r in json.loads(f.read_text())
    ]
    assert dolly == expected
    assert sum(1 for r in dolly if r.input.strip()) == 4_467
    # Dolly's eight task categories, as the dataset card counts them
    counts = {}
    for r in dolly:
        counts[r.category] = counts.get(r.category, 0) + 1
    assert counts == {"open_qa": 3742, "general_qa": 2191, "classification": 2136, "closed_qa": 1773,
                      "brainstorming": 1766, "information_extraction": 1506, "summarization": 1188,
                      "creative_writing": 709}


def test_split_counts_and_determinism(dolly, dolly_dir):
    train, val = split_records(dolly, val_size=2000, seed=42)
    assert (len(train), len(val)) == (13_011, 2_000)
    # every record lands in exactly one split (compare by identity: Dolly has duplicate texts)
    ids = sorted(map(id, train + val))
    assert ids == sorted(map(id, dolly))
    train2, val2 = split_records(dolly, val_size=2000, seed=42)
    assert train2 == train and val2 == val
    _, val3 = split_records(dolly, val_size=2000, seed=43)
    assert val3 != val
    assert len(set(map(id, val3)) & set(map(id, val))) < 500  # an independent draw overlaps ~2000*2000/15011=266

    # listing the files in another order gives the same records, hence the same split
    files = sorted(dolly_dir.glob("*.json"), reverse=True)
    shuffled, _ = load_records([str(f) for f in files])
    assert shuffled == dolly
    assert split_records(shuffled, 2000, 42)[1] == val

    # max_records draws a random subset from the same permutation
    sub_train, sub_val = split_records(dolly, val_size=20, seed=42, max_records=200)
    assert (len(sub_train), len(sub_val)) == (180, 20)
    assert sub_val == val[:20]


@pytest.mark.parametrize(
    "val_size, n_records, match",
    [(10, 10, "leaves no training records out of 10"), (11, 10, "no training records"),
     (0, 10, "validation split would be empty"), (1, 0, "no records")],
)
def test_empty_split_is_an_error(val_size, n_records, match):
    with pytest.raises(UserError, match=match):
        split_records([InstructionRecord(f"q{i}", "", "a") for i in range(n_records)], val_size, seed=0)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "context": "", "response": "b"},
        {"instruction": "c", "context": "", "response": "d"},
        '{"instruction": "e", "context": "", "response": ',
        {"instruction": "f", "context": "", "response": "g"},
    ])
    with pytest.raises(UserError, match=r"bad\.jsonl line 3: invalid JSON") as err:
        load_records(path)
    assert "\n" not in str(err.value)
    records, skipped = load_records(path, skip_invalid=True)
    assert skipped == 1
    assert [r.instruction for r in records] == ["a", "c", "f"]


def test_missing_field_names_field_and_location(tmp_path):
    rows = [{"instruction": "a", "context": "", "response": "b"}] * 2 + [{"instruction": "c", "context": "x"}]
    jsonl = _write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(UserError, match=r"x\.jsonl line 3: missing field 'response'"):
        load_records(jsonl, schema="dolly")
    array = tmp_path / "x.json"
    array.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"x\.json record index 2: missing field 'response'"):
        load_records(array, schema="dolly")
    # Alpaca field names under the Dolly schema: the missing Dolly field is named
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(UserError, match="missing field 'response'"):
        load_records(alpaca, schema="dolly")
    assert load_records(alpaca, schema="alpaca")[0] == [InstructionRecord("a", "", "b")]


def test_skip_invalid_counts_every_kind(tmp_path):
    rows = [
        {"instruction": "ok1", "input": "", "output": "x"},
        {"instruction": "no output"},
        '[1, 2]',
        '{not json',
        {"instruction": "", "input": "", "output": "empty instruction"},
        {"instruction": 5, "input": "", "output": "not a string"},
        {"instruction": "ok2", "input": None, "output": "null input is fine"},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    reasons = []
    records, skipped = load_records(path, skip_invalid=True, schema="alpaca", on_skip=reasons.append)
    assert skipped == 5
    assert [r.instruction for r in records] == ["ok1", "ok2"]
    assert [int(re.search(r"line (\d+)", r).group(1)) for r in reasons] == [2, 3, 4, 5, 6]


def test_truncated_files_are_errors_even_when_skipping(tmp_path, dolly_dir):
    text = (dolly_dir / "global_test.json").read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match=r"cut\.json is truncated: record index \d+ is incomplete"):
        load_records(cut, skip_invalid=True)
    # cut right after a complete record: still named as truncated
    end_of_record = text.index("}, {", len(text) // 2) + 1
    cut.write_text(text[:end_of_record])
    with pytest.raises(UserError, match=r"cut\.json is truncated"):
        load_records(cut)
    # a JSONL cut in its last line
    jsonl = tmp_path / "cut.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "out')
    with pytest.raises(UserError, match=r"cut\.jsonl line 2: incomplete JSON .* truncated"):
        load_records(jsonl, skip_invalid=True)
    # a syntax error inside a complete array names the record index
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "response": "b"}, {"instruction": "c" "response": "d"}]')
    with pytest.raises(UserError, match=r"broken\.json: invalid JSON in record index 1"):
        load_records(broken)


def test_missing_sources_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no .json or .jsonl files"):
        load_records(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    assert load_records(tmp_path / "empty.jsonl") == ([], 0)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="pass local files") as err:
        load_records("someone/data")
    assert "OfflineModeIsEnabled" in str(err.value)

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"instruction": "q", "input": "", "output": "a"}])
    assert load_records("someone/data") == ([InstructionRecord("q", "", "a")], 0)


# ---------------------------------------------------------------------------------------------------- tokenization


def test_mask_inputs_masks_exactly_the_prompt(dolly, tokenizer):
    # a mix of records with and without context
    sample = dolly[::300][:50]
    assert any(r.input.strip() for r in sample) and any(not r.input.strip() for r in sample)
    for record in sample:
        prompt_ids = tokenizer.encode(generate_prompt(record), bos=True)
        n = len(prompt_ids)
        example, dropped = tokenize_record(record, tokenizer, max_seq_length=100_000, mask_inputs=True)
        ids, labels = example["input_ids"], example["labels"]
        assert dropped == 0 and ids.dtype == labels.dtype == torch.long
        assert torch.equal(ids, tokenizer.encode(generate_prompt(record) + record.output, bos=True, eos=True))
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert torch.equal(ids[:n], prompt_ids)  # the prompt tokens are a prefix of the full encoding
        assert (labels[:n] == IGNORE_INDEX).all()
        assert torch.equal(labels[n:], ids[n:]) and len(ids) > n
        unmasked, _ = tokenize_record(record, tokenizer, max_seq_length=100_000, mask_inputs=False)
        assert torch.equal(unmasked["labels"], ids) and torch.equal(unmasked["input_ids"], ids)
    # the targets decode to the response
    example, _ = tokenize_record(sample[0], tokenizer, mask_inputs=True)
    targets = example["labels"][example["labels"] != IGNORE_INDEX][:-1]
    assert tokenizer.decode(targets) == sample[0].output.strip()


def test_truncation_counted_on_crafted_records(tmp_path, tokenizer, tokenizer_path):
    minimum = min_seq_length(tokenizer)
    assert minimum == 37  # BOS + 35 template tokens (empty instruction) + 1 response token
    max_len = 60
    rows = [{"instruction": f"Say {i}.", "input": "", "output": "word " * (i * 4)} for i in range(1, 11)]
    rows.append({"instruction": "long " * 80, "input": "", "output": "lost"})  # prompt alone is over max_len
    path = _write_jsonl(tmp_path / "crafted.jsonl", rows)
    # independent expectation from the plain encodings
    lengths = [len(tokenizer.encode(generate_prompt(r) + r["output"], bos=True, eos=True)) for r in rows]
    expected_truncated = sum(n > max_len for n in lengths)
    expected_dropped = sum(max(0, n - max_len) for n in lengths)
    assert 3 <= expected_truncated < len(rows)

    # the response policy (what preparation did before there were policies) cuts every tail, prompt or not
    meta = prepare(tmp_path / "out", tokenizer_path, source=path, schema="alpaca", val_size=3, seed=0,
                   max_seq_length=max_len, truncation="response", **_quiet())
    assert meta["truncation"] == {
        "policy": "response", "examples_too_long": expected_truncated, "examples_truncated": expected_truncated,
        "contexts_shortened": 0, "responses_cut": expected_truncated, "examples_dropped": 0,
        "examples_without_response": 1, "examples_without_target": 1, "tokens_dropped": expected_dropped,
    }
    assert meta["splits"]["train"]["examples_truncated"] + meta["splits"]["val"]["examples_truncated"] == (
        expected_truncated)
    assert meta["longest_example"]["tokens"] == max(lengths)
    train, val, _ = load_prepared(tmp_path / "out")
    assert sorted(len(ex["input_ids"]) for ex in train + val) == sorted(min(n, max_len) for n in lengths)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(min(n, max_len) for n in lengths)
    # truncation keeps the head: the cut example is a prefix of the full one
    example, dropped = tokenize_record(InstructionRecord("Say 10.", "", "word " * 40), tokenizer, max_len)
    full, _ = tokenize_record(InstructionRecord("Say 10.", "", "word " * 40), tokenizer, None)
    assert dropped == len(full["input_ids"]) - max_len
    assert torch.equal(example["input_ids"], full["input_ids"][:max_len])

    # the default policy: no input to shorten, so the tails are cut, but the record whose prompt alone is too long
    # is dropped instead of being kept without a response
    meta = prepare(tmp_path / "out3", tokenizer_path, source=path, schema="alpaca", val_size=3, seed=0,
                   max_seq_length=max_len, **_quiet())
    assert meta["truncation"]["policy"] == "context"
    assert (meta["truncation"]["responses_cut"], meta["truncation"]["examples_dropped"]) == (expected_truncated - 1, 1)
    assert meta["truncation"]["examples_without_target"] == meta["truncation"]["examples_without_response"] == 0
    assert meta["train_records"] + meta["val_records"] == len(rows) - 1

    with pytest.raises(UserError, match=f"need at least {minimum} tokens"):
        prepare(tmp_path / "out2", tokenizer_path, source=path, val_size=3, max_seq_length=minimum - 1, **_quiet())
    prepare(tmp_path / "out2", tokenizer_path, source=path, val_size=3, max_seq_length=minimum, truncation="response",
            **_quiet())


def test_prepare_dolly_subset_and_cache_roundtrip(tmp_path, tokenizer, tokenizer_path, dolly_dir, dolly):
    out = tmp_path / "dolly"
    meta = prepare(out, tokenizer_path, source=dolly_dir, schema="dolly", val_size=30, seed=7, max_records=300,
                   max_seq_length=512, **_quiet())
    assert (meta["records_loaded"], meta["train_records"], meta["val_records"]) == (15_011, 270, 30)
    assert meta["tokenizer"]["vocab_size"] == 32_000 and meta["template"] == "alpaca"
    assert meta["mask_inputs"] is True and meta["seed"] == 7 and meta["max_seq_length"] == 512
    assert json.loads((out / "metadata.json").read_text()) == meta
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "train.pt", "val.pt"]  # no temp files left

    raw = torch.load(out / "val.pt", weights_only=True)
    train, val, loaded_meta = load_prepared(out)
    assert loaded_meta == meta and len(train) == 270 and len(raw) == 30
    # the cached examples are exactly the tokenization of the seeded split
    expected_train, expected_val = split_records(dolly, 30, 7, max_records=300)
    for example, record in zip(val, expected_val):
        ref, _ = tokenize_record(record, tokenizer, 512, mask_inputs=True)
        assert torch.equal(example["input_ids"], ref["input_ids"]) and torch.equal(example["labels"], ref["labels"])
    assert meta["splits"]["train"]["target_tokens"] == sum(int((ex["labels"] != -100).sum()) for ex in train)


def test_failed_write_keeps_previous_cache(tmp_path, tokenizer_path, monkeypatch):
    out = tmp_path / "syn"
    prepare(out, tokenizer_path, source="synthetic", val_size=5, max_records=40, max_seq_length=512, **_quiet())
    before = load_prepared(out)
    calls = []

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return original_save(obj, path)

    original_save = torch.save
    monkeypatch.setattr(data_module.torch, "save", failing_save)
    with pytest.raises(OSError):
        prepare(out, tokenizer_path, source="synthetic", val_size=5, max_records=50, seed=1, max_seq_length=512,
                **_quiet())
    after = load_prepared(out)
    assert len(after[0]) == 35 and after[2] == before[2]
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "train.pt", "val.pt"]


def test_load_prepared_errors(tmp_path, tokenizer_path):
    with pytest.raises(UserError, match="no prepared data at .*prepare_dolly.py"):
        load_prepared(tmp_path / "missing")
    out = tmp_path / "syn"
    prepare(out, tokenizer_path, source="synthetic", val_size=5, max_records=20, max_seq_length=512, **_quiet())
    (out / "val.pt").unlink()
    with pytest.raises(UserError, match="val.pt missing"):
        load_prepared(out)
    torch.save(torch.load(out / "train.pt", weights_only=True)[:3], out / "val.pt")
    meta = json.loads((out / "metadata.json").read_text())
    meta["val_records"] = 5
    (out / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has 3 examples but metadata.json says 5"):
        load_prepared(out)
    (out / "val.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="val.pt cannot be loaded"):
        load_prepared(out)


# ------------------------------------------------------------------------------------------------ dataset, collate


def test_collate_pads_to_longest():
    batch = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
        {"input_ids": torch.tensor([1, 7, 8, 9, 2]), "labels": torch.tensor([-100, -100, 8, 9, 2])},
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([1])},
    ]
    dataset = InstructionDataset(batch)
    assert len(dataset) == 3 and dataset[1] is batch[1]
    out = collate_instructions([dataset[i] for i in range(3)], pad_id=0)
    assert out["input_ids"].shape == out["labels"].shape == (3, 5)
    assert out["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2], [1, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 8, 9, 2], [1, -100, -100, -100, -100]]
    out = collate_instructions(batch[:1], pad_id=3, ignore_index=-1, max_length=2)
    assert out["input_ids"].tolist() == [[1, 5]] and out["labels"].tolist() == [[-100, 5]]
    out = collate_instructions([batch[0], batch[2]], pad_id=3, ignore_index=-1)
    assert out["input_ids"].tolist() == [[1, 5, 6], [1, 3, 3]] and out["labels"].tolist() == [[-100, 5, 6], [1, -1, -1]]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_instructions)
    assert [b["input_ids"].shape for b in loader] == [(2, 5), (1, 1)]


# ------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_instructions_are_correct_and_deterministic():
    records = synthetic_instructions(400, seed=3)
    assert len(records) == 400 and records == synthetic_instructions(400, seed=3)
    assert records != synthetic_instructions(400, seed=4)
    kinds = set()
    for r in records:
        assert r.instruction and r.output
        if m := re.fullmatch(r"Add (\d+) and (\d+)\.", r.instruction):
            assert int(r.output) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"Reverse the word (\w+)\.", r.instruction):
            assert r.output == m[1][::-1]
        elif m := re.fullmatch(r"Repeat the word (\w+) three times\.", r.instruction):
            assert r.output == f"{m[1]} {m[1]} {m[1]}"
        elif r.instruction.startswith("Sort"):
            numbers = [int(x) for x in r.input.split(", ")]
            assert r.output == ", ".join(map(str, sorted(numbers)))
        elif m := re.fullmatch(r"Is (\d+) even or odd\?", r.instruction):
            assert r.output == ("even" if int(m[1]) % 2 == 0 else "odd")
        kinds.add(r.instruction.split()[0])
    assert len(kinds) >= 6
    assert sum(bool(r.input) for r in records) > 50  # both prompt variants are exercised
