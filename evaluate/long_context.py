"""Long-context evaluation of a base or fine-tuned checkpoint: passkey retrieval and perplexity against context
length, each with its plot (docs/long_context.md):

    python evaluate/long_context.py passkey --checkpoint_dir checkpoints/stories260K --out_dir out/passkey
    python evaluate/long_context.py curve --checkpoint_dir ... --adapter_dir out/run/final --data_dir ../shared/data
    python evaluate/long_context.py plot --reports '[a/passkey.json, b/passkey.json]' --out passkey.png
"""

import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402
from lit_adapter.model.attention import AttentionConfig  # noqa: E402
from lit_adapter.model.config import ModelArgs  # noqa: E402
from lit_adapter.model.quantize import LoadQuantize  # noqa: E402


def passkey(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    model: ModelArgs = ModelArgs(),
    attention: Optional[AttentionConfig] = None,
    lengths: Optional[List[int]] = None,
    depths: List[float] = [0.0, 0.25, 0.5, 0.75, 1.0],
    trials: int = 10,
    digits: int = 5,
    distractors: int = 9,
    seed: int = 0,
    out_dir: Optional[Path] = None,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    progress: bool = True,
) -> None:
    """Passkey retrieval (LongLoRA's and Landmark Attention's prompt): a random key hidden at a depth of filler text,
    answered greedily; accuracy per (length, depth) and the true key's rank among random keys (a score that a model
    too small to retrieve gets at chance level). Writes passkey.json, passkey.csv and the heatmaps passkey.png.

    Args:
        checkpoint_dir: Converted base checkpoint folder (model_config.json, weights, tokenizer.model).
        adapter_dir: A fine-tuning run's final/ folder (any method); none: the base.
        model: --model.rope_scaling extends the base's window (e.g. '{"type": "linear", "factor": 4}'); a
            fine-tuned run's own scaling comes from its final/adapter_config.json.
        attention: The attention pattern to evaluate with (default: the run's; dense for a base).
        lengths: Tokens per prompt, answer included (default: 256, doubling, up to the window); past the window
            is refused.
        depths: Where the key is: the fraction of the filler before it (0: first, 1: last).
        trials: Keys per cell; trial i hides the same key in every cell.
        digits: Digits of each key.
        distractors: Random keys of as many digits that the true key's likelihood is ranked among.
        seed: Seeds the keys.
        out_dir: Where to write the files (default: print only).
        quantize: How to load the base: as the fine-tune was trained (default), none, or a bnb type.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        device: cpu or cuda (default: cuda when available).
        progress: Show how many prompts are done.
    """
    from lit_adapter.evaluation.long_context import run_passkey

    run_passkey(checkpoint_dir, adapter_dir, lengths, depths, trials, digits, distractors, seed, out_dir, quantize,
                precision, device, model.rope_scaling, attention, progress)


def curve(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    model: ModelArgs = ModelArgs(),
    attention: Optional[AttentionConfig] = None,
    datasets: str = "wikitext2,c4",
    lengths: Optional[List[int]] = None,
    scored: int = 128,
    segments: int = 32,
    spacing: Optional[int] = None,
    batch_size: int = 1,
    data_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
) -> None:
    """Perplexity against context length: the same tokens (the last --scored of each window) scored with growing
    context. Writes context_length.json, context_length.csv and the curve context_length.png.

    Args:
        checkpoint_dir: Converted base checkpoint folder.
        adapter_dir: A fine-tuning run's final/ folder (any method); none: the base.
        model: --model.rope_scaling extends the base's window; a fine-tuned run brings its own.
        attention: The attention pattern to evaluate with (default: the run's; dense for a base).
        datasets: Comma-separated names among wikitext2, ptb, c4 (the test texts of evaluate/perplexity.py).
        lengths: Context lengths (default: 256, doubling, up to the window); past the window is refused.
        scored: Tokens scored at the end of each window, the same at every length (below the shortest length).
        segments: Scored stretches per dataset.
        spacing: Tokens between the ends of successive stretches (default: spread over the text; --scored makes
            them contiguous, i.e. evaluate/perplexity.py's --stride windows).
        batch_size: Windows per forward pass.
        data_dir: Folder with local copies of the texts, e.g. ../shared/data (default: the Hugging Face hub).
        out_dir: Where to write the files (default: print only).
        quantize: How to load the base: as the fine-tune was trained (default), none, or a bnb type.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        device: cpu or cuda (default: cuda when available).
    """
    from lit_adapter.evaluation.long_context import run_length_curve

    run_length_curve(checkpoint_dir, adapter_dir, datasets, lengths, scored, segments, spacing, batch_size, data_dir,
                     out_dir, quantize, precision, device, model.rope_scaling, attention)


def plot(reports: List[Path], out: Path, labels: Optional[List[str]] = None) -> None:
    """One picture of several runs: their passkey.json heatmaps side by side, or their context_length.json curves.

    Args:
        reports: The runs' passkey.json files, or their context_length.json files.
        out: The PNG to write.
        labels: One name per report (default: each report's model).
    """
    from lit_adapter.evaluation.long_context import plot_reports

    plot_reports(reports, out, labels)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, [passkey, curve, plot], as_positional=False)
