"""Generate text from a base LLaMA checkpoint with the KV cache."""

from pathlib import Path
from typing import Optional

from lit_adapter.errors import run_cli
from lit_adapter.generate import run_generation
from lit_adapter.quantize import LoadQuantize


def main(
    checkpoint_dir: Path,
    prompt: str = "Once upon a time",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    seed: int = 1234,
    device: Optional[str] = None,
) -> None:
    """Generate text from a base model: the text goes to stdout, tokens/s and peak memory to stderr.

    Args:
        checkpoint_dir: Converted checkpoint folder (model_config.json, weights, tokenizer.model).
        prompt: The text to continue.
        max_new_tokens: How many tokens to generate at most (stops early at end-of-sequence).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens.
        quantize: How to load the base: as the fine-tune was trained (default; recorded in its
            adapter_config.json), none (full precision), or bnb.int8 / bnb.nf4 / bnb.nf4-dq / bnb.fp4.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        seed: Random seed for sampling.
        device: cpu or cuda (default: cuda when available).
    """
    run_generation(checkpoint_dir, None, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, quantize=quantize, precision=precision, seed=seed, device=device)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
