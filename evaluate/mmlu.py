"""k-shot MMLU accuracy of a base or fine-tuned checkpoint, by the likelihood of the answer letter."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402
from lit_adapter.model.quantize import LoadQuantize  # noqa: E402


def main(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    k: int = 5,
    subjects: str = "all",
    max_questions_per_subject: Optional[int] = None,
    data_dir: Optional[Path] = None,
    batch_size: int = 8,
    out_dir: Optional[Path] = None,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    cot: Literal["none", "few_shot", "zero_shot"] = "none",
    cot_file: Optional[Path] = None,
    rationale_tokens: int = 128,
    style: Literal["hendrycks", "helm"] = "hendrycks",
) -> None:
    """MMLU accuracy per subject plus macro and micro averages; out_dir/mmlu.json holds every prediction.

    Each question is asked in Hendrycks' format after k dev examples of its subject; the answer is the letter
    among " A".." D" the model finds most likely after "Answer:". Shots are dropped (the last ones first) while
    a prompt does not fit the model's context. See docs/evaluation.md.

    Args:
        checkpoint_dir: Converted base checkpoint folder (model_config.json, weights, tokenizer.model).
        adapter_dir: A fine-tuning run's final/ folder; none: the base model.
        k: Dev examples shown before each question (0-5).
        subjects: "all" or comma-separated subject names (e.g. abstract_algebra,anatomy).
        max_questions_per_subject: Evaluate only the first N test questions of each subject.
        data_dir: Folder with dev/{subject}_dev.csv and test/{subject}_test.csv (original Hendrycks format or with
            the header question,choice0..choice3,answer), e.g. ../shared/data/mmlu; default: cais/mmlu from the hub.
        batch_size: Questions per forward pass.
        out_dir: Where to write mmlu.json (default: print only).
        quantize: How to load the base: as the fine-tune was trained (default; recorded in its
            adapter_config.json), none (full precision), or bnb.int8 / bnb.nf4 / bnb.nf4-dq / bnb.fp4.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        device: cpu or cuda (default: cuda when available).
        cot: Chain of thought, answered by generation: few_shot (demonstrations with rationales from --cot_file,
            then "The answer is (X).") or zero_shot ("Let's think step by step.", then "Therefore, among A through
            D, the answer is"); none: the letters' likelihood. Unreadable answers count as wrong.
        cot_file: JSON lines of few-shot CoT demonstrations: question, choices (4), answer, rationale[, subject].
        rationale_tokens: Tokens the model may spend on its reasoning.
        style: The prompt: hendrycks (the benchmark's evaluate.py, lm-eval's), or helm (HELM's mmlu scenario:
            "Question: " before each question, the subject with single spaces, HELM's draw and order of the dev
            shots; mmlu.json then also has the greedy token's exact match, HELM's metric). docs/evaluation.md.
    """
    from lit_adapter.evaluation.mmlu import run_mmlu

    run_mmlu(checkpoint_dir, adapter_dir, k=k, subjects=subjects, max_questions_per_subject=max_questions_per_subject,
             data_dir=data_dir, batch_size=batch_size, out_dir=out_dir, quantize=quantize, precision=precision,
             device=device, cot=cot, cot_file=cot_file, rationale_tokens=rationale_tokens, style=style)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
