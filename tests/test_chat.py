"""Chat data (``lit_adapter/data/chat.py``, ``scripts/prepare_chat.py``): rendered tokens equal HF's
``apply_chat_template`` for the Llama 3 template (byte-level BPE) and ChatML (the real LLaMA SentencePiece model),
the assistant-only masks equal HF's ``return_assistant_tokens_mask`` token by token, multi-turn masks, truncation by
whole turns, one-line errors for malformed records, and a run on prepared chat data whose ``final/`` generates with
the recorded template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from family_fixtures import llama3_tokenizer_dir
from lit_adapter.data.chat import (
    BUILTIN_TEMPLATES, ChatTemplate, fit_conversation, load_conversations, prepare_chat, resolve_template,
    tokenize_conversation,
)
from lit_adapter.data.instructions import load_prepared
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.errors import UserError

REPO = Path(__file__).resolve().parents[1]

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hi there 😀, how are you?"},
    {"role": "assistant", "content": "Fine, thanks!"},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "2 + 3 = 5.\nAnything else?"},
    {"role": "user", "content": "Reverse 'stop'."},
    {"role": "assistant", "content": "pots"},
]

# The same templates with TRL-style {% generation %} blocks around exactly what we train on (each reply and its
# end-of-turn marker): HF's return_assistant_tokens_mask is then an independent oracle for our masks.
LLAMA3_TAGGED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TAGGED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    return llama3_tokenizer_dir(tmp_path_factory.mktemp("llama3_tok"))


@pytest.fixture(scope="module")
def llama_hf_dir(tmp_path_factory, shared_data) -> Path:
    """The real 32,000-piece LLaMA tokenizer.model with the tokenizer.json that gives SentencePiece's ids."""
    from lit_adapter.convert.hf_tokenizer import write_tokenizer_files

    folder = tmp_path_factory.mktemp("llama_tok")
    ours = Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")
    write_tokenizer_files(folder, ours.processor.serialized_model_proto(), 4096)
    (folder / "tokenizer.model").write_bytes((shared_data / "tokenizers" / "llama" / "tokenizer.model").read_bytes())
    return folder


def hf_oracle(folder: Path, template: str, tagged: str, messages):
    """HF's ids for ``template`` and its assistant mask for the tagged twin (whose text must be the same)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    text = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert hf.apply_chat_template(messages, chat_template=tagged, tokenize=False) == text
    ids = hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    tagged_out = hf.apply_chat_template(messages, chat_template=tagged, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert list(tagged_out["input_ids"]) == list(ids)
    return text, list(ids), [bool(m) for m in tagged_out["assistant_masks"]]


@pytest.mark.parametrize("which", ["checkpoint", "llama3"])
def test_llama3_tokens_and_assistant_masks_equal_hf(llama3_dir, which):
    tok = Tokenizer(llama3_dir)
    template = resolve_template(tok, "auto" if which == "checkpoint" else "llama3")
    text, ids, mask = hf_oracle(llama3_dir, template.source, LLAMA3_TAGGED, CONVERSATION)
    assert template.render(CONVERSATION) == text
    ours, our_mask = tokenize_conversation(template, tok, CONVERSATION)
    assert ours == ids
    assert our_mask == mask and sum(mask) > 0  # token by token
    assert template.end_of_turn() == "<|eot_id|>"


def test_chatml_on_the_llama_sentencepiece_tokenizer_equals_hf(llama_hf_dir):
    tok = Tokenizer(llama_hf_dir / "tokenizer.model")
    template = resolve_template(tok, "chatml")
    text, ids, mask = hf_oracle(llama_hf_dir, BUILTIN_TEMPLATES["chatml"], CHATML_TAGGED, CONVERSATION)
    assert template.render(CONVERSATION) == text
    ours, our_mask = tokenize_conversation(template, tok, CONVERSATION)
    assert ours == ids and our_mask == mask
    assert template.end_of_turn() == "<|im_end|>"


def runs(mask):
    """``(start, end)`` of each run of True."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_assistant_turn_of_a_multi_turn_conversation_is_a_target_and_nothing_else(llama_hf_dir, name):
    tok = Tokenizer(llama_hf_dir / "tokenizer.model")
    template = resolve_template(tok, name)
    ids, mask = tokenize_conversation(template, tok, CONVERSATION)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    targets = runs(mask)
    assert len(targets) == len(replies)  # one contiguous run per assistant turn, in order
    for (start, end), reply in zip(targets, replies):
        decoded = tok.decode(ids[start:end])
        assert reply in decoded or reply.strip() == decoded.strip(), (name, decoded)
    # nothing of the system or user turns is a target
    outside = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert all(m["content"].strip()[:12] in outside for m in CONVERSATION if m["role"] != "assistant")
    assert not any(r in outside for r in replies)
    # the end-of-turn marker is learned (the model must learn to stop); llama2's is EOS itself
    if name == "llama2":
        assert [ids[end - 1] for _, end in targets] == [tok.eos_id] * len(replies)
    else:
        assert all(template.end_of_turn() in tok.decode(ids[s:e]) for s, e in targets)
    example, counts, full = fit_conversation(template, tok, CONVERSATION, max_seq_length=10_000)
    assert full == len(ids) and counts["examples_truncated"] == 0
    assert example["labels"].tolist() == [i if m else -100 for i, m in zip(ids, mask)]


def test_truncation_keeps_whole_turns_and_counts_what_it_cuts(llama3_dir):
    tok = Tokenizer(llama3_dir)
    template = resolve_template(tok, "llama3")
    full, _ = tokenize_conversation(template, tok, CONVERSATION)
    two, two_mask = tokenize_conversation(template, tok, CONVERSATION[:5])
    one, one_mask = tokenize_conversation(template, tok, CONVERSATION[:3])
    assert len(one) < len(two) < len(full)
    # room for two exchanges but not three: the third is dropped whole
    example, counts, n = fit_conversation(template, tok, CONVERSATION, max_seq_length=len(full) - 1)
    assert example["input_ids"].tolist() == two and n == len(full)
    assert example["labels"].tolist() == [i if m else -100 for i, m in zip(two, two_mask)]
    assert (counts["turns_dropped"], counts["responses_cut"], counts["examples_truncated"]) == (2, 0, 1)
    assert counts["tokens_dropped"] == len(full) - len(two)
    # not even the first exchange fits: its reply's tail is cut, the prompt kept
    example, counts, _ = fit_conversation(template, tok, CONVERSATION, max_seq_length=len(one) - 2)
    assert example["input_ids"].tolist() == one[:-2] and counts["responses_cut"] == 1 and counts["turns_dropped"] == 4
    # the prompt alone is too long: dropped, and counted
    prompt_len = one_mask.index(True)
    example, counts, _ = fit_conversation(template, tok, CONVERSATION, max_seq_length=prompt_len)
    assert example is None and counts["examples_dropped"] == 1
    # the other policies
    example, counts, _ = fit_conversation(template, tok, CONVERSATION, max_seq_length=len(full) - 1,
                                          policy="response")
    assert example["input_ids"].tolist() == full[:-1] and counts["responses_cut"] == 1
    assert fit_conversation(template, tok, CONVERSATION, len(full) - 1, policy="drop")[0] is None


def test_sharegpt_and_messages_read_alike_and_malformed_records_are_one_line(tmp_path):
    messages = {"messages": CONVERSATION}
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                   "value": m["content"]} for m in CONVERSATION]}
    (tmp_path / "a.jsonl").write_text(json.dumps(messages) + "\n" + json.dumps(sharegpt) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([sharegpt]))
    records, skipped = load_conversations([tmp_path / "a.jsonl", tmp_path / "b.json"])
    assert skipped == 0 and [m for _, m in records] == [CONVERSATION] * 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(messages) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl line 2: turn 0 has role 'robot'"):
        load_conversations(bad)
    assert load_conversations(bad, skip_invalid=True)[1] == 1
    for record, why in [({"text": "hi"}, "missing field 'messages'"),
                        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
                        ({"conversations": [{"from": "human", "value": ["x"]}]}, "'value' must be text")]:
        (tmp_path / "one.json").write_text(json.dumps([messages, record]))
        with pytest.raises(UserError, match=rf"one.json record index 1: .*{why}"):
            load_conversations(tmp_path / "one.json")


def test_a_template_error_names_the_record(tmp_path, llama_hf_dir):
    # Llama 2's template refuses two user turns in a row
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl line 1: the llama2 chat template: Conversation roles must alt"):
        prepare_chat(tmp_path / "out", llama_hf_dir / "tokenizer.model", tmp_path / "c.jsonl", template="llama2",
                     val_size=1, max_seq_length=256, progress=False, log=lambda *_: None)


def chat_records(n: int):
    records = []
    for i in range(n):
        a, b = i % 7, i % 5
        records.append({"conversations": [
            {"from": "human", "value": f"Add {a} and {b}."}, {"from": "gpt", "value": f"{a + b}."},
            {"from": "human", "value": "Now double it."}, {"from": "gpt", "value": f"{2 * (a + b)}."},
        ]})
    return records


def test_a_run_on_prepared_chat_data_records_its_template_and_generates_with_it(tmp_path, stories_checkpoint):
    from lit_adapter.cli.generate import generate_instruction_answer, run_generation
    from lit_adapter.tuners.lora import LoRAConfig
    from lit_adapter.tuners.registry import MethodSpec
    from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, LoggerArgs, TrainArgs, finetune

    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in chat_records(60)))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_chat.py"), "--checkpoint_dir",
                           str(stories_checkpoint), "--source", str(source), "--template", "chatml",
                           "--destination_path", str(tmp_path / "data"), "--val_size", "8",
                           "--max_seq_length", "96"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "truncation policy 'turns' at max_seq_length 96" in proc.stdout and "messages dropped" in proc.stdout
    train, val, metadata = load_prepared(tmp_path / "data")
    assert metadata["chat_template"]["name"] == "chatml" and metadata["truncation"]["turns_dropped"] > 0
    assert all(len(ex["input_ids"]) <= 96 and (ex["labels"] != -100).any() for ex in train + val)

    out = tmp_path / "run"
    result = finetune(
        MethodSpec("lora", settings=LoRAConfig(r=4, alpha=8)), checkpoint_dir=stories_checkpoint, model_name=None,
        out_dir=out, data=DataArgs(data_dir=tmp_path / "data"),
        train=TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=3, warmup_steps=1, learning_rate=1e-2),
        eval=EvalArgs(interval=1000, max_batches=1, prompts=["Add 1 and 2."], prompt_max_new_tokens=8),
        fabric_args=FabricArgs(accelerator="cpu"), logger=LoggerArgs(),
    )
    assert result.status == "completed"
    recorded = json.loads((out / "final" / "adapter_config.json").read_text())["chat_template"]
    assert recorded == metadata["chat_template"]
    assert json.loads((out / "hparams.json").read_text())["chat_template"]["name"] == "chatml"
    assert (out / "generations.jsonl").is_file()
    # stories260K has no template of its own: --chat works only through the run's recorded one
    with pytest.raises(UserError, match="has no chat template"):
        run_generation(stories_checkpoint, prompt="Add 1 and 2.", chat=True, device="cpu")
    seen = []
    original = ChatTemplate.prompt
    try:
        ChatTemplate.prompt = lambda self, text, system=None: seen.append(self.name) or original(self, text, system)
        answers = generate_instruction_answer(stories_checkpoint, out / "final", instruction="Add 1 and 2.",
                                              chat=True, max_new_tokens=6, temperature=0.0, device="cpu",
                                              stream=False)
    finally:
        ChatTemplate.prompt = original
    assert seen == ["chatml"] and len(answers) == 1 and "<|im_end|>" not in answers[0]
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Add 1 and 2."] and "<|im_end|>" not in rows[0]["response"]

    # scripts/compare_generations.py answers a chat-trained run through its template too (the base, through Alpaca's)
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_generations", REPO / "scripts" / "compare_generations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen.clear()
    try:
        ChatTemplate.prompt = lambda self, text, system=None: seen.append(text) or original(self, text, system)
        chat_run = module.answer_all(stories_checkpoint, out / "final", [{"instruction": "Add 1 and 2.", "input": ""}],
                                     6, 0.0, None, None, None, "cpu", 1)
        base = module.answer_all(stories_checkpoint, None, [{"instruction": "Add 1 and 2.", "input": ""}], 6, 0.0,
                                 None, None, None, "cpu", 1)
    finally:
        ChatTemplate.prompt = original
    assert seen == ["Add 1 and 2."] and len(chat_run["answers"]) == len(base["answers"]) == 1
