"""Perplexity of a base or fine-tuned checkpoint on wikitext-2, PTB and C4 (GPTQ-style protocol)."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.model.attention import AttentionConfig  # noqa: E402
from lit_adapter.model.config import ModelArgs  # noqa: E402
from lit_adapter.errors import run_cli  # noqa: E402
from lit_adapter.model.quantize import LoadQuantize  # noqa: E402


def main(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    model: ModelArgs = ModelArgs(),
    attention: Optional[AttentionConfig] = None,
    datasets: str = "wikitext2,ptb,c4",
    seqlen: Optional[int] = None,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    data_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    quantize: LoadQuantize = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    progress: bool = True,
) -> None:
    """Perplexity on the test texts of wikitext-2, PTB and C4, one line per dataset and out_dir/perplexity.json.

    The text is tokenized once (one BOS at the start) and cut into non-overlapping windows of --seqlen tokens,
    each scoring all its tokens but the first; --stride slides the windows instead (each scores only its last
    new tokens, with the earlier ones as context). A fine-tuned model is scored on the raw text, without the
    instruction template. See docs/evaluation.md.

    Args:
        checkpoint_dir: Converted base checkpoint folder (model_config.json, weights, tokenizer.model).
        adapter_dir: A fine-tuning run's final/ folder (adapter, adapter_v2, lora or a full fine-tune); none: the base.
        model: --model.rope_scaling extends the base's window (e.g. '{"type": "linear", "factor": 4}'); a
            fine-tuned run's own scaling comes from its final/adapter_config.json.
        attention: The attention pattern to evaluate with (default: the run's, as in its final/adapter_config.json;
            dense for a base), e.g. --attention.pattern dense for a model trained with shifted attention.
        datasets: Comma-separated names among wikitext2, ptb, c4.
        seqlen: Tokens per window (default: the model's window, block_size, at most 2048); past the window is refused.
        stride: Sliding-window mode: new tokens scored per window (1..seqlen); default: non-overlapping windows.
        max_windows: Evaluate only the first N windows of each dataset (a quick, partial number).
        batch_size: Windows per forward pass.
        data_dir: Folder with local copies (wikitext-2-raw/wiki.test.joined.txt, ptb/ptb.test.txt,
            c4/c4-validation.00000-of-00008.json.gz or c4/c4-train.00000-of-01024.first1000.json.gz), e.g.
            ../shared/data; default: download from the Hugging Face hub.
        out_dir: Where to write perplexity.json (default: print only).
        quantize: How to load the base: as the fine-tune was trained (default; recorded in its
            adapter_config.json), none (full precision), or bnb.int8 / bnb.nf4 / bnb.nf4-dq / bnb.fp4.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that support it, else 32-true).
        device: cpu or cuda (default: cuda when available).
        progress: Show a progress bar with tokens/s and the time left.
    """
    from lit_adapter.evaluation.perplexity import run_perplexity

    run_perplexity(
        checkpoint_dir, adapter_dir, datasets=datasets, seqlen=seqlen, stride=stride, max_windows=max_windows,
        batch_size=batch_size, data_dir=data_dir, out_dir=out_dir, quantize=quantize, precision=precision,
        device=device, progress=progress, rope_scaling=model.rope_scaling,
        attention=attention,
    )


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
