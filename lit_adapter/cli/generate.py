"""The ``generate/*.py`` commands: load a base (and a fine-tune), decode, print.

One prompt streams its text as it is produced; a ``--prompts_file`` (one prompt or instruction per line) is decoded
as one left-padded batch and printed prompt by prompt. ``--stop`` strings end a row where they appear (the text is
cut before them, and while streaming nothing that might be the start of one is printed early). Tokens/s and peak
memory go to stderr, the text to stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List, Literal, Optional

import torch

from lit_adapter.errors import UserError, require_folder
from lit_adapter.model.quantize import LoadQuantize


class RowText:
    """The text of one generated row, cut at the first stop string, and what of it is safe to show so far."""

    def __init__(self, tokenizer, stops: List[str], write: Optional[Callable[[str], None]] = None) -> None:
        self.tokenizer, self.stops, self.write = tokenizer, [s for s in stops if s], write
        self.ids: List[int] = []
        self.shown = 0
        self.stopped = False

    def text(self) -> str:
        """Everything decoded so far, cut before the first stop string."""
        text = self.tokenizer.decode([i for i in self.ids if i != self.tokenizer.eos_id])
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def _safe(self, text: str) -> str:
        # hold back an incomplete UTF-8 character and anything that may still grow into a stop string
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]

    def add(self, token: int) -> bool:
        """Appends ``token``; True when a stop string has appeared."""
        self.ids.append(token)
        full = self.tokenizer.decode([i for i in self.ids if i != self.tokenizer.eos_id])
        self.stopped = any(s in full for s in self.stops)
        if self.write is not None:
            visible = self.text() if self.stopped else self._safe(full)
            if len(visible) > self.shown:
                self.write(visible[self.shown:])
                self.shown = len(visible)
        return self.stopped

    def flush(self) -> None:
        """At the end: shows what was held back (no stop string came)."""
        if self.write is not None:
            text = self.text()
            if len(text) > self.shown:
                self.write(text[self.shown:])
                self.shown = len(text)


def _read_prompts(prompts_file: Path) -> List[str]:
    path = Path(prompts_file)
    if not path.is_file():
        raise UserError(f"--prompts_file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"--prompts_file {path} line {line} is not UTF-8 text (byte {err.start}); "
                        "save it as UTF-8") from None
    lines = [line.rstrip("\n") for line in text.splitlines()]
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts_file {path} holds no prompt (one per line; \\n for a line break inside one)")
    return prompts


def _eos_text(tokenizer) -> str:
    from lit_adapter.data.chat import special_token

    return special_token(tokenizer, "eos")


def run_generation(
    checkpoint_dir,
    adapter_dir=None,
    prompt: Optional[str] = None,
    instruction: Optional[str] = None,
    input: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    seed: int = 1234,
    device: Optional[str] = None,
    expected_method: Optional[str] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    stop: Optional[List[str]] = None,
    prompts_file: Optional[Path] = None,
    stream: bool = True,
    compile: bool = False,
    as_instructions: bool = False,
    chat: bool = False,
    system: Optional[str] = None,
) -> List[str]:
    """Loads a base (plus optional fine-tuned tensors), generates, prints text to stdout and stats to stderr.

    ``expected_method`` (the ``generate/<method>.py`` scripts) refuses an ``adapter_dir`` of another method.
    ``chat`` renders each prompt as a user turn (after ``system``) with the chat template the fine-tune in
    ``adapter_dir`` trained with (its ``adapter_config.json``), else the checkpoint's own (``tokenizer_config.json``),
    and stops at the end of the assistant's turn (``<|eot_id|>``, ``<|im_end|>``: :mod:`lit_adapter.data.chat`).
    Returns the generated texts (one per prompt).
    """
    from lit_adapter.generation.decode import generate_batch, room_for
    from lit_adapter.tuners.registry import load_finetuned, read_spec
    from lit_adapter.train.preflight import check_tokenizer_fits
    from lit_adapter.data.prompts import InstructionRecord, generate_prompt
    from lit_adapter.runtime import peak_memory_gb, resolve_device, resolve_precision, weights_dtype
    from lit_adapter.generation.sampling import check_sampling
    from lit_adapter.data.tokenizer import Tokenizer

    given = [name for name, value in (("--prompt", prompt), ("--instruction", instruction),
                                      ("--prompts_file", prompts_file)) if value is not None]
    if len(given) != 1:
        raise UserError("pass exactly one of --prompt (raw text), --instruction (uses the instruction template) or "
                        "--prompts_file (one per line, decoded as a batch)")
    if prompts_file is not None:
        texts = _read_prompts(prompts_file)
        templated = as_instructions
    else:
        texts, templated = [prompt if prompt is not None else instruction], instruction is not None
    prompts = [generate_prompt(InstructionRecord(instruction=t, input=input, output="")) if templated else t
               for t in texts]
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    torch.manual_seed(seed)
    checkpoint_dir = Path(checkpoint_dir)
    require_folder(checkpoint_dir)  # before its tokenizer: a misspelled folder is not a missing tokenizer
    tokenizer = Tokenizer(checkpoint_dir)
    end_of_turn = None
    if chat:
        if templated:
            raise UserError("--chat true formats the prompt with the model's chat template; pass it as --prompt, "
                            "not --instruction")
        from lit_adapter.data.chat import end_of_turn_id, recorded_template, resolve_template

        # the template the run trained with (recorded in its adapter_config.json), else the checkpoint's own
        template = recorded_template(adapter_dir) or resolve_template(tokenizer)
        prompts = [template.prompt(p, system) for p in prompts]
        marker = template.end_of_turn()
        end_of_turn = end_of_turn_id(tokenizer, marker)
        if end_of_turn is None and marker and marker != _eos_text(tokenizer):
            stop = [*(stop or []), marker]
    t0 = time.perf_counter()
    if adapter_dir is not None and expected_method is not None:
        found = read_spec(adapter_dir)[0].method
        if found != expected_method:
            script = Path(__file__).resolve().parents[2] / "generate" / f"{found}.py"
            hint = f"; use generate/{found}.py" if script.is_file() else "; use generate/finetuned.py (any method)"
            raise UserError(f"{adapter_dir} holds a {found} fine-tune, not {expected_method}{hint}")
    config, model, spec = load_finetuned(checkpoint_dir, adapter_dir, dev, weights_dtype(precision), quantize)
    check_tokenizer_fits(tokenizer, config, checkpoint_dir)
    print(f"loaded {spec.describe()} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    if chat:  # a chat template writes BOS (and other special tokens) itself
        from lit_adapter.data.chat import encode_chat

        encoded = [torch.tensor(encode_chat(tokenizer, p)[0], device=dev) for p in prompts]
    else:
        encoded = [tokenizer.encode(p, bos=True, device=dev) for p in prompts]
    room = min(room_for(model, e.numel()) for e in encoded)
    if room < max_new_tokens:
        print(f"note: at most {room} new tokens fit in the model's window of {config.block_size}", file=sys.stderr)
    streaming = stream and len(prompts) == 1

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    rows = [RowText(tokenizer, stop or [], write if streaming else None) for _ in prompts]
    if streaming and not templated and not chat:
        write(prompts[0])
    t0 = time.perf_counter()
    tokens = generate_batch(model, encoded, max_new_tokens, temperature, top_k, tokenizer.eos_id, top_p=top_p,
                            repetition_penalty=repetition_penalty, compile=compile,
                            on_token=lambda row, token: rows[row].add(token),
                            stop=lambda row, ids: rows[row].stopped or bool(ids) and ids[-1] == end_of_turn)
    elapsed = time.perf_counter() - t0
    results = [row.text() for row in rows]
    if streaming:
        rows[0].flush()
        write("\n")
    else:
        for i, (shown, text) in enumerate(zip(texts, results)):
            if len(prompts) > 1:
                print(f"--- {i + 1}: {shown}")
            print(text if templated else prompts[i] + text)
    count = sum(len(t) for t in tokens)
    print(f"{count} tokens in {elapsed:.2f}s: {count / max(elapsed, 1e-9):.1f} tokens/s "
          f"({len(prompts)} prompt{'s' if len(prompts) > 1 else ''}); peak memory {peak_memory_gb(dev):.2f} GB",
          file=sys.stderr)
    return results


def generate_instruction_answer(
    checkpoint_dir: Path,
    adapter_dir: Path,
    instruction: Optional[str] = "Give three tips for staying healthy.",
    input: str = "",
    prompts_file: Optional[Path] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    stop: Optional[List[str]] = None,
    stream: bool = True,
    compile: bool = False,
    quantize: LoadQuantize = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    seed: int = 1234,
    device: Optional[str] = None,
    chat: bool = False,
    system: Optional[str] = None,
) -> List[str]:
    """Answer an instruction, wrapped in the same prompt template as training; the answer goes to stdout.

    Args:
        checkpoint_dir: The base checkpoint the run fine-tuned.
        adapter_dir: The run's final/ (or best/) folder (adapter.safetensors and adapter_config.json).
        instruction: The instruction to answer (null with --prompts_file).
        input: Optional context for the instruction (the template's "### Input:" section).
        prompts_file: A file of instructions, one per line (\\n for a line break inside one), answered as one batch.
        max_new_tokens: How many tokens to generate at most (stops early at end-of-sequence).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens.
        top_p: Nucleus sampling: only among the most likely tokens whose probability reaches top_p.
        repetition_penalty: Divide (multiply, if negative) the logits of tokens already in the text by this; 1 is off.
        stop: Stop a text where one of these strings appears (it is cut before it).
        stream: Print a single answer token by token as it is produced.
        compile: torch.compile the one-token decode step (faster after a compile of tens of seconds).
        quantize: How to load the base: as the fine-tune was trained (default; recorded in its adapter_config.json),
            none (full precision), or bnb.int8 / bnb.nf4 / bnb.nf4-dq / bnb.fp4.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        seed: Random seed for sampling.
        device: cpu or cuda (default: cuda when available).
        chat: Prompt with the chat template the run trained with (a run on scripts/prepare_chat.py data records it
            in adapter_config.json; else the checkpoint's own): the instruction is the user's turn, and the answer
            stops at the end of the assistant's turn.
        system: With --chat true, a system message before the user's.
    """
    return _answer(**locals())


def _answer(expected_method: Optional[str] = None, **kwargs) -> List[str]:
    if kwargs.get("prompts_file") is not None:
        kwargs["instruction"] = None
    chat = kwargs.get("chat", False)
    if chat:  # the instruction is the user's turn of the chat template, not the Alpaca template's instruction
        if kwargs.pop("input", ""):
            raise UserError("--input belongs to the instruction template; with --chat true write it into --instruction")
        kwargs["prompt"] = kwargs.pop("instruction")
    return run_generation(kwargs.pop("checkpoint_dir"), kwargs.pop("adapter_dir"), expected_method=expected_method,
                          as_instructions=not chat, **kwargs)


def instruction_command(method: str):
    """``generate/<method>.py``'s entry point: :func:`generate_instruction_answer` for ``method``'s runs only,
    defaulting to ``out/<method>/final``."""
    import functools
    import inspect

    @functools.wraps(generate_instruction_answer)
    def command(**kwargs):
        return _answer(expected_method=method, **kwargs)

    signature = inspect.signature(generate_instruction_answer)
    params = [p.replace(default=Path(f"out/{method}/final")) if p.name == "adapter_dir" else p
              for p in signature.parameters.values()]
    command.__signature__ = signature.replace(parameters=params)
    return command
