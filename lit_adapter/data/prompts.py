"""The instruction prompt template (Stanford Alpaca), shared by data preparation, generation and evaluation.

Taori et al., "Stanford Alpaca: An Instruction-following LLaMA Model" (2023) fine-tune LLaMA on records of
``instruction`` / optional ``input`` / ``output`` rendered with the template below; LLaMA-Adapter (Zhang et al.,
2023, arXiv:2303.16199) trains on the same template. Dolly-15k records (``instruction`` / ``context`` /
``response``) map onto the same three fields, with ``context`` as the input.

A model fine-tuned with one template only answers well when prompted with exactly the same text, so
training, generation and evaluation all build their prompt through :func:`generate_prompt`.

A chat model (Llama 3 Instruct) is prompted with its own chat template instead: :func:`chat_prompt` renders a
user message (and an optional system one) with the checkpoint's ``tokenizer_config.json`` ``chat_template``, as
HF's ``apply_chat_template`` does (``generate/base.py --chat true``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

from lit_adapter.errors import UserError

TEMPLATE_NAME = "alpaca"

UNKNOWN_CATEGORY = "unknown"
"""The category of an example whose source has none (Alpaca files, folders prepared before categories were kept)."""

RESPONSE_MARKER = "### Response:\n"

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + RESPONSE_MARKER
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER
)


@dataclass(frozen=True)
class InstructionRecord:
    """One instruction example: Alpaca's instruction/input/output, Dolly's instruction/context/response."""

    instruction: str
    input: str = ""
    output: str = ""
    category: str = ""
    """The record's task (Dolly's ``category``: open_qa, closed_qa, ...); empty when the source has none."""


def generate_prompt(record: Union[InstructionRecord, Mapping[str, str]]) -> str:
    """The prompt for ``record`` up to and including ``### Response:\\n``; the output is not part of it.

    ``record`` may also be a mapping with ``instruction`` and optionally ``input`` (or Dolly's ``context``).
    An input that is empty or only whitespace selects the template without an ``### Input:`` section.
    """
    if isinstance(record, Mapping):
        instruction = record["instruction"]
        context = record.get("input", record.get("context", "")) or ""
    else:
        instruction, context = record.instruction, record.input
    if context.strip():
        return _WITH_INPUT.format(instruction=instruction, input=context)
    return _WITHOUT_INPUT.format(instruction=instruction)


def chat_prompt(tokenizer, text: str, system: Optional[str] = None) -> str:
    """``text`` as a user turn (after ``system``, if given) under the tokenizer's chat template, ending with the
    assistant's header; the template writes BOS itself, so encode the result with ``bos=False``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"the tokenizer {tokenizer.path} has no chat template (tokenizer_config.json's "
                        "chat_template); prompt it with plain text or --instruction instead")
    messages: List[Dict[str, str]] = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template(messages + [{"role": "user", "content": text}])


def input_span(record: InstructionRecord) -> Optional[Tuple[int, int]]:
    """Where ``record.input`` sits in ``generate_prompt(record)``: ``(start, end)`` character offsets, or ``None``
    when the prompt has no ``### Input:`` section (the input is empty or only whitespace).

    Data preparation shortens a too-long input in place (``lit_adapter.data.truncation``) and needs to know which
    characters of the rendered prompt are the input and which are the template around it.
    """
    if not record.input.strip():
        return None
    head = _WITH_INPUT.split("{input}")[0].format(instruction=record.instruction)
    return len(head), len(head) + len(record.input)


def extract_response(text: str) -> str:
    """The part of a generated text after the first ``### Response:`` marker (all of it if there is none)."""
    _, marker, response = text.partition(RESPONSE_MARKER)
    return response.strip() if marker else text.strip()
