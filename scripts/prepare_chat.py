"""Prepares chat data (ShareGPT or OpenAI-style messages) for fine-tuning with the loss on the assistant turns only."""

from pathlib import Path
from typing import List, Literal, Optional, Union

from lit_adapter.data.chat import prepare_chat
from lit_adapter.errors import UserError, run_cli


def main(
    checkpoint_dir: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    destination_path: Path = Path("data/chat"),
    source: Union[str, List[str]] = "data/chat.jsonl",
    template: str = "auto",
    format: Literal["auto", "sharegpt", "messages"] = "auto",
    val_size: int = 200,
    seed: int = 42,
    max_seq_length: Optional[int] = None,
    truncation: Literal["turns", "response", "drop"] = "turns",
    skip_invalid: bool = False,
    max_records: Optional[int] = None,
) -> None:
    """Renders conversations with a chat template and tokenizes them into train.pt, val.pt and metadata.json.

    Only the assistant turns (each reply and the template's end-of-turn marker) are in the loss, in every turn of a
    multi-turn conversation; system and user turns and the template's markup get the ignore index. The template is
    recorded in metadata.json; a run trained on the data records it in final/adapter_config.json, and
    generate/*.py --chat true and eval.prompts prompt with it.

    Args:
        checkpoint_dir: Checkpoint folder whose tokenizer (and tokenizer_config.json's chat_template) to use.
        tokenizer_path: A tokenizer file or folder (or give --checkpoint_dir).
        destination_path: Folder to write train.pt, val.pt and metadata.json into.
        source: A Hugging Face Hub dataset id (needs internet), or local data: a .jsonl file, a JSON-array .json
            file, several files ([a.json,b.json]) or a folder of them. Each record holds "messages" (a list of
            role/content, roles system, user and assistant) or ShareGPT's "conversations" (a list of from/value, from
            system, human or gpt).
        template: auto (the checkpoint's own chat_template from tokenizer_config.json), a built-in (llama2, llama3,
            chatml), or the path of a .jinja file.
        format: The records' format; auto decides per record by its field (messages or conversations).
        val_size: Number of conversations drawn at random for the validation split.
        seed: Seed of the train/validation split (and of the --max_records subset).
        max_seq_length: Tokens per example; default: the model's context length (block_size in model_config.json).
        truncation: What to do with a conversation longer than max_seq_length. turns: drop whole exchanges from its
            end, so every kept reply is complete; only when the first exchange alone does not fit is its reply's
            tail cut. response: cut the tail wherever it falls. drop: skip the conversation. What was cut is printed
            and recorded in metadata.json.
        skip_invalid: Skip (and count) malformed records instead of stopping at the first one.
        max_records: Use only this many randomly chosen conversations (for quick runs).
    """
    if (checkpoint_dir is None) == (tokenizer_path is None):
        raise UserError("give exactly one of --checkpoint_dir and --tokenizer_path")
    prepare_chat(destination_path, checkpoint_dir if checkpoint_dir is not None else tokenizer_path, source,
                 template=template, fmt=format, val_size=val_size, seed=seed, max_seq_length=max_seq_length,
                 truncation=truncation, skip_invalid=skip_invalid, max_records=max_records)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
