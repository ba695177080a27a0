"""Truncation policies on real Dolly records with the real stories260K vocabulary (about one token per character,
so at 256 tokens most records do not fit and every policy has work to do)."""

import json
from dataclasses import replace

import pytest
import torch

from lit_adapter.data.instructions import load_prepared, load_records, prepare
from lit_adapter.errors import UserError
from lit_adapter.data.prompts import generate_prompt
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.data.truncation import IGNORE_INDEX, fit_record, tokenize_record

MAX_LEN = 256


@pytest.fixture(scope="module")
def tokenizer(stories260k):
    return Tokenizer(stories260k)


@pytest.fixture(scope="module")
def sample(shared_data):
    records, _ = load_records(shared_data / "dolly")
    return records[::25]  # 601 records, spread over the categories (the files are grouped by category)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory, sample):
    path = tmp_path_factory.mktemp("dolly") / "sample.json"
    path.write_text(json.dumps([{"instruction": r.instruction, "context": r.input, "response": r.output}
                                for r in sample]))
    return path


def _length(tokenizer, record, with_output=True):
    text = generate_prompt(record) + (record.output if with_output else "")
    return len(tokenizer.encode(text, bos=True, eos=with_output))


def expected_counts(records, tokenizer, policy):
    """What each policy must do, from the plain encodings alone (not from the code under test)."""
    counts = dict(too_long=0, shortened=0, cut=0, dropped=0, without_target=0)
    for record in records:
        if _length(tokenizer, record) <= MAX_LEN:
            continue
        counts["too_long"] += 1
        prompt = _length(tokenizer, record, with_output=False)
        if policy == "drop":
            counts["dropped"] += 1
        elif policy == "response":
            counts["cut"] += 1
            counts["without_target"] += prompt >= MAX_LEN
        else:
            bare = replace(record, input="")  # the shortest prompt the context policy can reach
            has_input = bool(record.input.strip())
            if _length(tokenizer, bare) <= MAX_LEN:  # some (maybe empty) part of the input leaves room for it all
                counts["shortened"] += 1
            elif _length(tokenizer, bare, with_output=False) >= MAX_LEN:  # not one response token fits
                counts["dropped"] += 1
            else:
                counts["shortened"] += has_input
                counts["cut"] += 1
    return counts


@pytest.mark.parametrize("policy", ["context", "response", "drop"])
def test_policy_counts_match_an_independent_computation(policy, sample, sample_file, tokenizer, stories260k,
                                                        tmp_path):
    expected = expected_counts(sample, tokenizer, policy)
    assert expected["too_long"] > 300  # the sample exercises the policies
    out = tmp_path / policy
    meta = prepare(out, stories260k, source=sample_file, schema="dolly", val_size=50, seed=0,
                   max_seq_length=MAX_LEN, truncation=policy, progress=False, log=lambda _: None)
    counts = meta["truncation"]
    assert counts["policy"] == policy
    assert counts["examples_too_long"] == expected["too_long"]
    assert counts["contexts_shortened"] == expected["shortened"]
    assert counts["responses_cut"] == expected["cut"]
    assert counts["examples_dropped"] == expected["dropped"]
    assert counts["examples_without_target"] == expected["without_target"]
    assert counts["examples_truncated"] == expected["too_long"] - expected["dropped"]
    if policy == "context":
        assert expected["shortened"] > 50 and expected["dropped"] > 0 and expected["without_target"] == 0
    if policy == "response":
        assert expected["without_target"] > 100  # the data loss the context policy prevents
    for key in ("examples_too_long", "contexts_shortened", "responses_cut", "examples_dropped"):
        assert meta["splits"]["train"][key] + meta["splits"]["val"][key] == counts[key]  # splits add up to the totals
    train, val, loaded = load_prepared(out)
    assert loaded["truncation"] == counts
    assert len(train) + len(val) == len(sample) - expected["dropped"]
    assert all(len(ex["input_ids"]) <= MAX_LEN for ex in train + val)
    without_target = sum(int((ex["labels"] != IGNORE_INDEX).sum()) == 0 for ex in train + val)
    assert without_target == expected["without_target"]


def test_context_policy_keeps_the_response_and_a_prefix_of_the_input(sample, tokenizer):
    checked = 0
    for record in sample:
        fitted = fit_record(record, tokenizer, MAX_LEN, mask_inputs=True, policy="context")
        if not fitted.context_shortened or fitted.response_cut:
            continue
        ids, labels = fitted.example["input_ids"], fitted.example["labels"]
        assert ids[-1] == tokenizer.eos_id and len(ids) <= MAX_LEN
        # the targets are the whole response, token for token as the model continues the prompt
        assert tokenizer.decode(labels[labels != IGNORE_INDEX][:-1]) == record.output.strip()
        text = tokenizer.decode(ids)
        head, marker, rest = text.partition("### Input:\n")
        if marker:  # the input kept is a prefix of the original, in the template's own "### Input:" section
            kept = rest.partition("\n\n### Response:\n")[0]
            assert kept and record.input.startswith(kept.rstrip()) and len(kept) < len(record.input)
            assert head == generate_prompt(record).partition("### Input:\n")[0].lstrip()
            # cut at a token boundary as late as fits: the example is full to the last position or one short
            assert len(ids) >= MAX_LEN - 1
        else:  # input removed: rendered as a record without one, as generation renders it
            assert text.startswith(generate_prompt(replace(record, input="")).lstrip())
        checked += 1
    assert checked > 50


def test_default_is_the_models_window_and_leaves_every_example_a_target(sample_file, stories260k, tmp_path):
    meta = prepare(tmp_path / "out", stories260k, source=sample_file, schema="dolly", val_size=50, seed=0,
                   progress=False, log=lambda _: None)
    assert meta["max_seq_length"] == meta["model_block_size"] == 512  # stories260K's block_size
    assert meta["truncation"]["policy"] == "context"
    assert meta["truncation"]["examples_without_target"] == meta["truncation"]["examples_without_response"] == 0
    train, val, _ = load_prepared(tmp_path / "out")
    assert all((ex["labels"] != IGNORE_INDEX).any() for ex in train + val)


def test_drop_everything_and_unknown_policy_are_user_errors(sample_file, stories260k, tmp_path, tokenizer, sample):
    with pytest.raises(UserError, match="dropped all .* examples at max_seq_length 98: use --truncation context"):
        prepare(tmp_path / "o", stories260k, source=sample_file, val_size=50, max_seq_length=98, truncation="drop",
                progress=False, log=lambda _: None)
    with pytest.raises(UserError, match="unknown truncation policy 'tail'"):
        prepare(tmp_path / "o", stories260k, source=sample_file, val_size=50, truncation="tail")
    example, dropped = tokenize_record(sample[0], tokenizer, 100, truncation="drop")
    assert example is None and dropped == len(tokenizer.encode(generate_prompt(sample[0]) + sample[0].output,
                                                               bos=True, eos=True))
    assert torch.equal(tokenize_record(sample[0], tokenizer, None)[0]["input_ids"],
                       tokenizer.encode(generate_prompt(sample[0]) + sample[0].output, bos=True, eos=True))
