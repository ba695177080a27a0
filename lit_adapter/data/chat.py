"""Chat data users bring: ShareGPT and OpenAI-style ``messages`` conversations, rendered with a chat template and
tokenized with the loss on the assistant turns only.

Why it is built this way:

* **The model's own template.** A chat model answers well only when prompted with the text it was trained on, so
  conversations are rendered with the checkpoint's ``chat_template`` (``tokenizer_config.json``) or a named built-in
  (:data:`BUILTIN_TEMPLATES`: ``llama2``, ``llama3``, ``chatml``), through a jinja2 environment set up as
  transformers sets up its own (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the same
  ``raise_exception``, ``strftime_now``, ``tojson``, ``bos_token``/``eos_token`` and ``add_generation_prompt``), so the
  text equals HF's ``apply_chat_template``. The template used is recorded in the prepared data's ``metadata.json``;
  a run carries it into ``hparams.json`` and ``final/adapter_config.json``, and generation (``--chat true``) and
  ``eval.prompts`` prompt with it.
* **Assistant turns, found without trusting the template's markup.** Each assistant turn ``i`` is located by
  rendering the conversation up to it with the generation prompt (where the model starts writing) and up to and
  including it without (where its turn, end-of-turn marker included, ends): the characters in between are what the
  model must learn to write. This works for any template that renders a conversation prefix by prefix, which is
  what generation relies on too; a template that does not is refused in one line. Tokens overlapping those
  characters are the targets, as HF's ``return_assistant_tokens_mask`` marks the tokens of ``{% generation %}``
  blocks; every other label is the ignore index.
* **Special tokens in the text.** A template writes ``<s>`` or ``<|eot_id|>`` as text. Byte-level BPE tokenizers
  (``tokenizers``) encode those as their special tokens, as HF does; for SentencePiece the text is split at its
  BOS/EOS pieces, which become their ids, and each piece of text between them is encoded on its own (Meta's
  Llama 2 chat format encodes each turn that way).
* **Truncation keeps whole turns.** A conversation longer than ``max_seq_length`` loses whole exchanges from its
  end, so every kept assistant turn is complete; only when its first exchange alone does not fit is that reply's
  tail cut (``turns``, the default). ``response`` cuts the tail wherever it falls, ``drop`` skips the conversation.
  What was cut is counted, printed and written to ``metadata.json``.

Prepared examples are the instruction pipeline's ``{"input_ids", "labels"}`` (:mod:`lit_adapter.data.instructions`),
so they train, pack and validate through the same objective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lit_adapter.data.chat_template import ChatTemplate, Message
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.data.truncation import IGNORE_INDEX, Example
from lit_adapter.errors import UserError

BUILTIN_TEMPLATES: Dict[str, str] = {
    # meta-llama/Llama-2-7b-chat-hf's template (system prompt folded into the first user turn, BOS per exchange)
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct's template
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
        "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
        "{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # ChatML (OpenAI; Qwen, OpenHermes and many others)
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
OWN_TEMPLATE = "auto"
"""``--template auto``: the checkpoint's own ``chat_template``."""
CHAT_POLICIES = ("turns", "response", "drop")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMATS = ("auto", "sharegpt", "messages")


# ----------------------------------------------------------------------------------------------------- templates


def special_token(tokenizer: Tokenizer, which: str) -> str:
    """The text of the tokenizer's BOS or EOS token (``which`` is ``"bos"`` or ``"eos"``), as templates write it."""
    config = getattr(tokenizer, "tokenizer_config", None) or {}
    named = config.get(f"{which}_token")
    if isinstance(named, dict):
        named = named.get("content")
    if isinstance(named, str):
        return named
    token_id = getattr(tokenizer, f"{which}_id")
    if token_id is None or token_id < 0:
        return ""
    if getattr(tokenizer, "processor", None) is not None:
        return tokenizer.processor.id_to_piece(token_id)
    return tokenizer.backend.id_to_token(token_id) or ""


def resolve_template(tokenizer: Tokenizer, template: str = OWN_TEMPLATE) -> ChatTemplate:
    """``template`` for ``tokenizer``: ``auto`` (the checkpoint's own ``chat_template``), a built-in name, or the
    path of a ``.jinja`` file."""
    bos, eos = special_token(tokenizer, "bos"), special_token(tokenizer, "eos")
    if template == OWN_TEMPLATE:
        own = getattr(tokenizer, "chat_template", None)
        if own is None:
            raise UserError(f"the tokenizer {tokenizer.path} has no chat template (tokenizer_config.json's "
                            f"chat_template): prepare chat data with --template {' / '.join(BUILTIN_TEMPLATES)} or a "
                            ".jinja file, and prompt a base model with plain text")
        return ChatTemplate("checkpoint", own, bos, eos)
    if template in BUILTIN_TEMPLATES:
        return ChatTemplate(template, BUILTIN_TEMPLATES[template], bos, eos)
    path = Path(template)
    if path.is_file():
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"), bos, eos)
    raise UserError(f"unknown chat template {template!r}: choose auto (the checkpoint's own), "
                    f"{', '.join(BUILTIN_TEMPLATES)}, or the path of a .jinja file")


def recorded_template(adapter_dir: Optional[Path]) -> Optional[ChatTemplate]:
    """The chat template a run trained with, from its ``final/`` (or ``best/``) ``adapter_config.json``."""
    path = Path(adapter_dir) / "adapter_config.json" if adapter_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return ChatTemplate.from_dict(recorded) if isinstance(recorded, dict) else None


# ------------------------------------------------------------------------------------------------------ encoding


def encode_chat(tokenizer: Tokenizer, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    """The ids of rendered chat ``text`` (special tokens written in it become their ids; no BOS is added: templates
    write their own) and each token's ``(begin, end)`` UTF-8 byte span in ``text``."""
    if getattr(tokenizer, "processor", None) is None:  # byte-level BPE: tokenizers handles special tokens itself
        return tokenizer.encode(text, bos=False).tolist(), tokenizer.token_spans(text)
    specials = {tokenizer.processor.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i >= 0}
    ids: List[int] = []
    spans: List[Tuple[int, int]] = []
    raw = text.encode("utf-8")
    pos = 0
    while pos < len(raw):
        hits = [(raw.find(s.encode(), pos), s) for s in specials]
        hits = [(at, s) for at, s in hits if at >= 0]
        at, special = min(hits) if hits else (len(raw), None)
        if at > pos:
            chunk = raw[pos:at].decode("utf-8")
            ids += tokenizer.encode(chunk, bos=False).tolist()
            spans += [(pos + b, pos + e) for b, e in tokenizer.token_spans(chunk)]
        if special is None:
            break
        ids.append(specials[special])
        spans.append((at, at + len(special.encode())))
        pos = at + len(special.encode())
    return ids, spans


def end_of_turn_id(tokenizer: Tokenizer, marker: str) -> Optional[int]:
    """The id of the end-of-turn ``marker`` when it is one token of the vocabulary (``<|eot_id|>``), else ``None``
    (generation then stops at the marker's text)."""
    if not marker:
        return None
    ids, _ = encode_chat(tokenizer, marker)
    return ids[0] if len(ids) == 1 else None


def assistant_spans(template: ChatTemplate, messages: Sequence[Message]) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each reply and the template's
    end-of-turn marker after it), found by rendering prefixes (see the module docstring)."""
    text = template.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        through = template.render(messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError(f"the {template.name} chat template does not render a conversation prefix by prefix "
                            f"(turn {i + 1} renders differently once later turns follow), so its assistant turns "
                            "cannot be located; use a built-in --template")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(template: ChatTemplate, tokenizer: Tokenizer,
                          messages: Sequence[Message]) -> Tuple[List[int], List[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn."""
    text, spans = assistant_spans(template, messages)
    ids, token_spans = encode_chat(tokenizer, text)
    byte_at = _char_to_byte(text)
    byte_spans = [(byte_at[s], byte_at[e]) for s, e in spans]
    # a byte-fallback token that only starts a character has an empty span: it belongs where that character does
    mask = [any(b < e_ and max(e, b + 1) > s_ for s_, e_ in byte_spans) for b, e in token_spans]
    return ids, mask


def _char_to_byte(text: str) -> List[int]:
    offsets = [0]
    for ch in text:
        offsets.append(offsets[-1] + len(ch.encode("utf-8")))
    return offsets


def make_example(ids: Sequence[int], mask: Sequence[bool]) -> Example:
    input_ids = torch.tensor(list(ids), dtype=torch.long)
    labels = input_ids.clone()
    labels[~torch.tensor(list(mask), dtype=torch.bool)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


# -------------------------------------------------------------------------------------------------- truncation

CHAT_COUNT_KEYS = ("examples_too_long", "examples_truncated", "turns_dropped", "responses_cut", "examples_dropped",
                   "examples_without_target", "tokens_dropped")


def fit_conversation(template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[Message], max_seq_length: int,
                     policy: str = "turns") -> Tuple[Optional[Example], Dict[str, int], int]:
    """One conversation as a training example under the truncation ``policy``; returns the example (``None`` when
    dropped), what was cut (the :data:`CHAT_COUNT_KEYS` for this one conversation) and its untruncated length."""
    if policy not in CHAT_POLICIES:
        raise UserError(f"unknown truncation policy {policy!r} for chat data; choose one of {', '.join(CHAT_POLICIES)}")
    counts = dict.fromkeys(CHAT_COUNT_KEYS, 0)
    ids, mask = tokenize_conversation(template, tokenizer, messages)
    full = len(ids)
    if full > max_seq_length:
        counts["examples_too_long"] = 1
        if policy == "drop":
            ids, mask = [], []
        elif policy == "turns":
            ids, mask, dropped, cut = _keep_whole_turns(template, tokenizer, messages, max_seq_length)
            counts["turns_dropped"], counts["responses_cut"] = dropped, int(cut)
        else:
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            counts["responses_cut"] = 1
        counts["examples_truncated"] = int(bool(ids))
    counts["tokens_dropped"] = full - len(ids)
    if not ids:
        counts["examples_dropped"] = 1
        return None, counts, full
    counts["examples_without_target"] = int(not any(mask[1:]))
    return make_example(ids, mask), counts, full


def _keep_whole_turns(template, tokenizer, messages, max_seq_length):
    """The longest prefix ending with an assistant reply that fits, and how many messages it leaves out; when not
    even the first reply fits, its tail is cut (or the conversation dropped when its prompt alone is too long)."""
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed(ends[:-1]):
        ids, mask = tokenize_conversation(template, tokenizer, messages[:end])
        if len(ids) <= max_seq_length:
            return ids, mask, len(messages) - end, False
    ids, mask = tokenize_conversation(template, tokenizer, messages[: ends[0]])
    if not any(mask[1:max_seq_length]):  # the prompt leaves no room for a single reply token
        return [], [], len(messages), False
    return ids[:max_seq_length], mask[:max_seq_length], len(messages) - ends[0], True


def describe_chat_truncation(counts: Dict[str, int], policy: str, max_seq_length: int, n: int, longest: int,
                             origin: str = "") -> str:
    return (f"truncation policy {policy!r} at max_seq_length {max_seq_length}{origin}: "
            f"{counts['examples_too_long']:,} of {n:,} conversations did not fit; {counts['turns_dropped']:,} "
            f"messages dropped as whole turns, {counts['responses_cut']:,} replies cut, {counts['examples_dropped']:,} "
            f"conversations dropped ({counts['tokens_dropped']:,} tokens removed; the longest conversation has "
            f"{longest:,})")


# ------------------------------------------------------------------------------------------------------ records


def to_messages(obj: Any, fmt: str = "auto") -> List[Message]:
    """The ``role``/``content`` messages of one record: ShareGPT (``conversations`` of ``from``/``value``) or
    OpenAI-style ``messages``; a malformed record raises ``ValueError`` saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with 'messages' or 'conversations', got {type(obj).__name__}")
    if fmt == "auto":
        fmt = "messages" if "messages" in obj else "sharegpt" if "conversations" in obj else ""
        if not fmt:
            raise ValueError("missing field 'messages' (OpenAI style) or 'conversations' (ShareGPT)")
    key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from",
                                                                                            "value")
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {key!r} must be a non-empty list of turns")
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {n} of {key!r} is not an object")
        role, content = turn.get(role_key), turn.get(text_key)
        role = SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else role
        if role not in ROLES:
            allowed = ", ".join(SHAREGPT_ROLES if fmt == "sharegpt" else ROLES)
            raise ValueError(f"turn {n} has {role_key} {turn.get(role_key)!r}; expected one of {allowed}")
        if not isinstance(content, str):
            raise ValueError(f"turn {n}'s {text_key!r} must be text, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    while messages and messages[-1]["role"] != "assistant":  # trailing prompts teach nothing
        messages.pop()
    if not messages:
        raise ValueError("the conversation has no assistant turn to learn from")
    if messages[0]["role"] == "assistant":
        raise ValueError("the conversation starts with an assistant turn; expected a system or user turn first")
    return messages


def load_conversations(source, fmt: str = "auto", skip_invalid: bool = False,
                       on_skip: Optional[Callable[[str], None]] = None) -> Tuple[List[Tuple[str, List[Message]]], int]:
    """``([(location, messages)], n_skipped)`` of a Hub dataset id or local JSON/JSONL file(s)/folder(s)."""
    from lit_adapter.data.records import iter_source

    if fmt not in FORMATS:
        raise UserError(f"unknown chat format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out, skipped = [], 0
    for where, obj in iter_source(source):
        try:
            if isinstance(obj, ValueError):
                raise obj
            out.append((where, to_messages(obj, fmt)))
        except ValueError as err:
            if not skip_invalid:
                raise UserError(f"{where}: {err} (pass --skip_invalid true to skip invalid records)") from None
            skipped += 1
            if on_skip is not None:
                on_skip(f"{where}: {err}")
    return out, skipped


def tokenize_conversations(name: str, records: Sequence[Tuple[str, List[Message]]], template: ChatTemplate,
                           tokenizer: Tokenizer, max_seq_length: int, policy: str,
                           progress: bool = False) -> Tuple[List[Example], Dict[str, Any]]:
    """The examples of one split and its statistics (``examples``, the :data:`CHAT_COUNT_KEYS`, ``tokens``,
    ``target_tokens``, the longest conversation); a template error names the record."""
    from tqdm import tqdm

    stats: Dict[str, Any] = {"examples": len(records), **dict.fromkeys(CHAT_COUNT_KEYS, 0), "tokens": 0,
                             "target_tokens": 0, "longest_tokens": 0, "longest_record": None}
    examples = []
    for where, messages in tqdm(records, desc=f"tokenizing {name}", unit=" conversations", disable=not progress,
                                file=sys.stderr, mininterval=0.5):
        try:
            example, counts, full = fit_conversation(template, tokenizer, messages, max_seq_length, policy)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        for key, value in counts.items():
            stats[key] += value
        if full > stats["longest_tokens"]:
            stats["longest_tokens"], stats["longest_record"] = full, where
        if example is not None:
            stats["tokens"] += len(example["input_ids"])
            stats["target_tokens"] += int((example["labels"] != IGNORE_INDEX).sum())
            examples.append(example)
    return examples, stats


# ------------------------------------------------------------------------------------------------------ preparing


def prepare_chat(destination_path, tokenizer_path, source, template: str = OWN_TEMPLATE, fmt: str = "auto",
                 val_size: int = 200, seed: int = 42, max_seq_length: Optional[int] = None, truncation: str = "turns",
                 skip_invalid: bool = False, max_records: Optional[int] = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Loads, splits and tokenizes conversations and writes ``train.pt``, ``val.pt`` and ``metadata.json`` (the
    instruction pipeline's files, with the chat template recorded) into ``destination_path``; returns the
    metadata."""
    from lit_adapter.data.instructions import FORMAT_VERSION, model_block_size, split_records, write_atomically
    from lit_adapter.data.records import report_skipped, resolve_source

    destination_path = Path(destination_path)
    if destination_path.exists() and not destination_path.is_dir():
        raise UserError(f"the destination {destination_path} exists and is not a folder")
    if truncation not in CHAT_POLICIES:
        raise UserError(f"unknown truncation policy {truncation!r} for chat data; choose one of "
                        f"{', '.join(CHAT_POLICIES)}")
    block_size = model_block_size(tokenizer_path)
    origin = ""
    if max_seq_length is None:
        if block_size is None:
            raise UserError(f"{tokenizer_path} has no model_config.json to take the model's context length from: "
                            "pass the model's --checkpoint_dir, or --max_seq_length")
        max_seq_length, origin = block_size, " (the model's block_size)"
    if max_seq_length < 2:
        raise UserError(f"max_seq_length must be at least 2 tokens, got {max_seq_length}")
    tokenizer = Tokenizer(tokenizer_path)
    chat = resolve_template(tokenizer, template)
    reasons: List[str] = []
    records, skipped = load_conversations(source, fmt, skip_invalid, reasons.append)
    report_skipped(log, skipped, reasons)
    if not records:
        raise UserError(f"no valid conversations in {source}")
    train, val = split_records(records, val_size, seed, max_records)
    files = resolve_source(source)
    described = str(source) if files is None else [str(p) for p in files] if len(files) > 1 else str(files[0])
    log(f"loaded {len(records):,} conversations from {described if isinstance(described, str) else len(described)}"
        f"{'' if isinstance(described, str) else ' files'}; {len(train):,} for training and {len(val):,} for "
        f"validation (seed {seed}); chat template {chat.name}, loss on the assistant turns only")
    splits = {name: tokenize_conversations(name, split, chat, tokenizer, max_seq_length, truncation, progress)
              for name, split in (("train", train), ("val", val))}
    for name, (examples, _) in splits.items():
        if not examples:
            raise UserError(f"the truncation policy {truncation!r} dropped all {name} conversations at "
                            f"max_seq_length {max_seq_length}: raise --max_seq_length")
    counts = {key: splits["train"][1][key] + splits["val"][1][key] for key in CHAT_COUNT_KEYS}
    longest = max(stats["longest_tokens"] for _, stats in splits.values())
    log(describe_chat_truncation(counts, truncation, max_seq_length, len(train) + len(val), longest, origin))
    if block_size is not None and max_seq_length > block_size:
        log(f"warning: max_seq_length {max_seq_length} is longer than the model's block_size {block_size}")
    log(f"using {len(splits['train'][0]):,} training and {len(splits['val'][0]):,} validation conversations")
    metadata = {
        "format_version": FORMAT_VERSION, "source": described, "schema": f"chat:{fmt}", "template": "chat",
        "chat_template": chat.to_dict(), "records_loaded": len(records), "records_skipped_invalid": skipped,
        "max_records": max_records, "train_records": len(splits["train"][0]), "val_records": len(splits["val"][0]),
        "val_size": val_size, "seed": seed, "max_seq_length": max_seq_length, "model_block_size": block_size,
        "mask_inputs": True, "ignore_index": IGNORE_INDEX, "truncation": {"policy": truncation, **counts},
        "splits": {name: stats for name, (_, stats) in splits.items()},
        "tokenizer": {"path": str(Path(tokenizer_path).resolve()), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
    }
    write_atomically(destination_path, splits["train"][0], splits["val"][0], metadata)
    log(f"wrote train.pt, val.pt and metadata.json to {destination_path}")
    return metadata
