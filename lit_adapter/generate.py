"""Autoregressive sampling with the KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from lit_adapter.quantize import LoadQuantize


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``; temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yields the new token ids one at a time (a 0-d tensor each) for a 1-D ``prompt``; stops after ``eos_id``."""
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise UserError("the prompt must encode to at least one token")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    block_size = model.config.block_size - model.num_virtual_tokens  # the real tokens' context
    total = prompt.numel() + max_new_tokens
    if prompt.numel() > block_size:
        raise UserError(f"the prompt has {prompt.numel()} tokens; the model's context is {block_size}")
    max_new_tokens = min(max_new_tokens, block_size - prompt.numel())
    model.set_kv_cache(batch_size=1, max_seq_length=min(total, block_size), device=prompt.device)
    try:
        input_pos = torch.arange(prompt.numel(), device=prompt.device)
        logits = model(prompt[None], input_pos=input_pos)[0, -1]
        for step in range(max_new_tokens):
            token = sample(logits[None], temperature, top_k)[0]
            yield token
            if eos_id is not None and token.item() == eos_id:
                return
            if step + 1 == max_new_tokens:
                return
            input_pos = input_pos[-1:] + 1
            logits = model(token.view(1, 1), input_pos=input_pos)[0, -1]
    finally:
        model.clear_kv_cache()


def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
) -> torch.Tensor:
    """The prompt followed by the generated tokens (1-D); the EOS token, if reached, is included."""
    new = list(generate_tokens(model, prompt, max_new_tokens, temperature, top_k, eos_id))
    if not new:
        return prompt
    return torch.cat([prompt, torch.stack(new).to(prompt.dtype)])


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
) -> str:
    """Loads a base (plus optional fine-tuned tensors), generates, prints text to stdout and stats to stderr.

    ``expected_method`` (the ``generate/<method>.py`` scripts) refuses an ``adapter_dir`` of another method.
    """
    import sys
    import time

    from lit_adapter.methods import load_finetuned, read_spec
    from lit_adapter.preflight import check_tokenizer_fits
    from lit_adapter.runtime import peak_memory_gb, resolve_device, resolve_precision, weights_dtype
    from lit_adapter.tokenizer import Tokenizer

    if (prompt is None) == (instruction is None):
        raise UserError("pass exactly one of --prompt (raw text) or --instruction (uses the instruction template)")
    if instruction is not None:
        from lit_adapter.prompts import generate_prompt

        prompt = _instruction_prompt(generate_prompt, instruction, input)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise UserError("--temperature must be >= 0 (0 is greedy) and --top_k >= 1 (or null)")
    torch.manual_seed(seed)
    checkpoint_dir = Path(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    if adapter_dir is not None and expected_method is not None:
        found = read_spec(adapter_dir)[0].method
        if found != expected_method:
            script = Path(__file__).resolve().parents[1] / "generate" / f"{found}.py"
            hint = f"; use generate/{found}.py" if script.is_file() else ""
            raise UserError(f"{adapter_dir} holds a {found} fine-tune, not {expected_method}{hint}")
    config, model, spec = load_finetuned(checkpoint_dir, adapter_dir, dev, weights_dtype(precision), quantize)
    check_tokenizer_fits(tokenizer, config, checkpoint_dir)
    print(f"loaded {spec.describe()} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    encoded = tokenizer.encode(prompt, bos=True, device=dev)
    t0 = time.perf_counter()
    tokens = list(generate_tokens(model, encoded, max_new_tokens, temperature, top_k, eos_id=tokenizer.eos_id))
    elapsed = time.perf_counter() - t0
    new = [t.item() for t in tokens if t.item() != tokenizer.eos_id]
    text = tokenizer.decode(new)
    print(text if instruction is not None else prompt + text)
    print(
        f"{len(tokens)} tokens in {elapsed:.2f}s: {len(tokens) / max(elapsed, 1e-9):.1f} tokens/s; "
        f"peak memory {peak_memory_gb(dev):.2f} GB",
        file=sys.stderr,
    )
    return text


def _instruction_prompt(generate_prompt, instruction: str, input: str) -> str:
    from lit_adapter.data import InstructionRecord

    return generate_prompt(InstructionRecord(instruction=instruction, input=input, output=""))


def generate_instruction_answer(
    checkpoint_dir: Path,
    adapter_dir: Path,
    instruction: str = "Give three tips for staying healthy.",
    input: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    seed: int = 1234,
    device: Optional[str] = None,
) -> str:
    """Answer an instruction, wrapped in the same prompt template as training; the answer goes to stdout.

    Args:
        checkpoint_dir: The base checkpoint the run fine-tuned.
        adapter_dir: The run's final/ folder (adapter.safetensors and adapter_config.json).
        instruction: The instruction to answer.
        input: Optional context for the instruction (the template's "### Input:" section).
        max_new_tokens: How many tokens to generate at most (stops early at end-of-sequence).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens.
        quantize: How to load the base: as the fine-tune was trained (default; recorded in its
            adapter_config.json), none (full precision), or bnb.int8 / bnb.nf4 / bnb.nf4-dq / bnb.fp4.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        seed: Random seed for sampling.
        device: cpu or cuda (default: cuda when available).
    """
    return _answer(**locals())


def _answer(expected_method: Optional[str] = None, **kwargs) -> str:
    return run_generation(kwargs.pop("checkpoint_dir"), kwargs.pop("adapter_dir"), expected_method=expected_method,
                          **kwargs)


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
