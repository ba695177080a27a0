"""Continue text with a base LLaMA checkpoint (or a fine-tune of any method) and the KV cache."""

from pathlib import Path
from typing import List, Literal, Optional

from lit_adapter.errors import run_cli
from lit_adapter.cli.generate import run_generation
from lit_adapter.model.quantize import LoadQuantize


def main(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    prompt: Optional[str] = "Once upon a time",
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
) -> None:
    """Generate text from a base model: the text goes to stdout, tokens/s and peak memory to stderr.

    Args:
        checkpoint_dir: Converted checkpoint folder (model_config.json, weights, tokenizer.model).
        adapter_dir: Optionally a fine-tune's final/ or best/ folder, of any method, to continue text with.
        prompt: The text to continue (null with --prompts_file).
        prompts_file: A file of prompts, one per line (\\n for a line break inside one), continued as one batch.
        max_new_tokens: How many tokens to generate at most (stops early at end-of-sequence).
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens.
        top_p: Nucleus sampling: only among the most likely tokens whose probability reaches top_p.
        repetition_penalty: Divide (multiply, if negative) the logits of tokens already in the text by this; 1 is off.
        stop: Stop a text where one of these strings appears (it is cut before it).
        stream: Print a single text token by token as it is produced.
        compile: torch.compile the one-token decode step (faster after a compile of tens of seconds).
        quantize: Load the weights in 8 or 4 bits with bitsandbytes (none: full precision).
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        seed: Random seed for sampling.
        device: cpu or cuda (default: cuda when available).
        chat: Render the prompt as a user turn with a chat template and stop at the end of the assistant's turn:
            the one a fine-tune in --adapter_dir trained with (scripts/prepare_chat.py data record it), else the
            checkpoint's own (tokenizer_config.json's chat_template: Llama 3 Instruct).
        system: With --chat true, a system message before the user's.
    """
    run_generation(checkpoint_dir, adapter_dir, prompt=None if prompts_file is not None else prompt,
                   prompts_file=prompts_file, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, stream=stream, compile=compile,
                   quantize=quantize, precision=precision, seed=seed, device=device, chat=chat, system=system)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
