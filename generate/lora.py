"""Answer an instruction with a base LLaMA and the tensors of a lora fine-tuning run."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402
from lit_adapter.generate import run_generation  # noqa: E402


def main(
    checkpoint_dir: Path,
    adapter_dir: Path = Path("out/lora/final"),
    instruction: str = "Give three tips for staying healthy.",
    input: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    quantize: Optional[Literal["bnb.int8", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4"]] = None,
    precision: Optional[str] = None,
    seed: int = 1234,
    device: Optional[str] = None,
) -> None:
    """Answer an instruction, wrapped in the same prompt template as training; the answer goes to stdout.

    Args:
        checkpoint_dir: The base checkpoint the run fine-tuned.
        adapter_dir: The run's final/ folder (adapter.safetensors and adapter_config.json).
        instruction: The instruction to answer.
        input: Optional context for the instruction (the template's "### Input:" section).
        max_new_tokens: How many tokens to generate at most (stops early at end-of-sequence).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens.
        quantize: Load the frozen base in 8 or 4 bits with bitsandbytes.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        seed: Random seed for sampling.
        device: cpu or cuda (default: cuda when available).
    """
    run_generation(checkpoint_dir, adapter_dir, instruction=instruction, input=input, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, quantize=quantize, precision=precision, seed=seed,
                   device=device)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
