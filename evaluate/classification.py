"""Accuracy by generation on sentiment (Rotten Tomatoes) or NLI (MultiNLI), zero-, one- or few-shot.

    python evaluate/classification.py --checkpoint_dir checkpoints/Llama-3-8B --task nli --prompt seed002 --shots 1 \\
        --temperature 0.5                           # seed 002's one-shot row (--shots 0: its zero-shot row)
"""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402
from lit_adapter.model.quantize import LoadQuantize  # noqa: E402


def main(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    task: Literal["sentiment", "nli"] = "sentiment",
    shots: int = 0,
    template: Literal["auto", "plain", "instruction"] = "auto",
    max_examples: Optional[int] = None,
    max_new_tokens: int = 5,
    temperature: float = 0.0,
    seed: int = 42,
    data_dir: Optional[Path] = None,
    nli_file: Optional[Path] = None,
    out_file: Optional[Path] = None,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    cot: Literal["none", "few_shot", "zero_shot"] = "none",
    cot_file: Optional[Path] = None,
    rationale_tokens: int = 64,
    prompt: Literal["default", "seed002"] = "default",
) -> None:
    """Classify by generating the label after k demonstrations; prints accuracy, no-answer rate and per-label counts.

    The demonstrations come, with a fixed seed, from a pool of examples that are never evaluated. Answers are
    parsed leniently ("Positive!", "the sentiment is negative.", "maybe" for neutral); an answer naming no label
    or several counts as wrong. See docs/evaluation.md.

    Args:
        checkpoint_dir: Converted base checkpoint folder (model_config.json, weights, tokenizer.model).
        adapter_dir: A fine-tuning run's final/ folder; none: the base model.
        task: sentiment (Rotten Tomatoes polarity) or nli (MultiNLI, entailment/neutral/contradiction).
        shots: Demonstrations in each prompt (0: zero-shot).
        template: plain ("Review: ...\\nSentiment:"), instruction (the Alpaca template used in fine-tuning) or auto
            (instruction with --adapter_dir, plain without).
        max_examples: Evaluate only the first N examples (after the seeded shuffle).
        max_new_tokens: Tokens generated per answer.
        temperature: Sampling temperature; 0 means greedy decoding.
        seed: Seed of the shuffle, of the demonstrations and of sampling.
        data_dir: Folder holding rotten_tomatoes/rt-polarity.pos and .neg (default: ../shared/data beside the
            checkout).
        nli_file: Local NLI data (JSON, JSONL or TSV with premise, hypothesis, label); default: nyu-mll/multi_nli
            validation_matched from the Hugging Face hub.
        out_file: Where to write the JSON report with every answer (default: print only).
        quantize: How to load the base: as the fine-tune was trained (default; recorded in its
            adapter_config.json), none (full precision), or bnb.int8 / bnb.nf4 / bnb.nf4-dq / bnb.fp4.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        device: cpu or cuda (default: cuda when available).
        cot: Chain of thought: few_shot (demonstrations with a rationale, then the label; the answer is read from
            the end of the model's reasoning) or zero_shot ("Let's think step by step.", then "Therefore, the
            sentiment (positive or negative) is"); none: answer directly. --shots does not apply to CoT.
        cot_file: JSON lines of few-shot CoT demonstrations (text or premise/hypothesis, rationale, label); default:
            the few built into lit_adapter/evaluation/cot.py.
        rationale_tokens: Tokens the model may spend on its reasoning.
        prompt: default, or seed002 (--task nli, plain text): seed 002's question "Does the hypothesis follow from
            the premise? Answer (yes, no, maybe):" after the premise and hypothesis, yes/maybe/no read as
            entailment/neutral/contradiction; --shots 1 gives it the seed's own demonstration.
    """
    from lit_adapter.evaluation.classification import run_classification

    run_classification(checkpoint_dir, adapter_dir, task=task, shots=shots, template=template,
                       max_examples=max_examples, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       data_dir=data_dir, nli_file=nli_file, out_file=out_file, quantize=quantize,
                       precision=precision, device=device, cot=cot, cot_file=cot_file,
                       rationale_tokens=rationale_tokens, prompt=prompt)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
