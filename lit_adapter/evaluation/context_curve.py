"""Perplexity against context length: does the model predict the same tokens better when it sees more before them?

Perplexity at one ``--seqlen`` mixes two things: how well the model predicts and how much context the average
token had. Here the *scored tokens are fixed* and only the context grows. The test text (wikitext-2, C4: the
corpora of :mod:`lit_adapter.evaluation.perplexity`, read and tokenized the same way) gives ``segments`` stretches of
``scored`` tokens; at each context length L, each stretch is scored as the last ``scored`` tokens of the L-token
window that ends with it. So the first scored token sees ``L - scored`` tokens and the last ``L - 1``, and every
length scores exactly the same tokens, as in LongLoRA's and Position Interpolation's perplexity-by-context-window
tables (which use proof-pile / PG-19 books; here the local wikitext-2 and C4 text stand in for long documents).

The stretches end at ``max(lengths)``, then every ``spacing`` tokens (default: spread evenly over the corpus, so
the text is varied). With ``spacing == scored`` they are contiguous and each length is exactly ``evaluate/
perplexity.py --seqlen L --stride scored`` restricted to those tokens (its sliding windows), which the tests check.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from lit_adapter.errors import UserError
from lit_adapter.evaluation.perplexity import Window, score_windows


@dataclass
class Point:
    dataset: str
    context: int
    """Window length L: the scored tokens have ``L - scored`` to ``L - 1`` tokens of context."""
    perplexity: float
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens_scored: int
    seconds: float


def segment_ends(n_tokens: int, longest: int, scored: int, segments: int, spacing: Optional[int] = None) -> List[int]:
    """Where the scored stretches end: the first at ``longest`` (so the longest window fits), then ``spacing``
    apart (default: spread over the corpus, a multiple of ``scored`` so stretches never overlap)."""
    if segments < 1:
        raise UserError(f"--segments must be at least 1, got {segments}")
    room = n_tokens - longest  # tokens after the first stretch's end
    if spacing is None:
        spacing = max(scored, (room // max(segments - 1, 1)) // scored * scored) if segments > 1 else scored
    elif spacing < scored:
        raise UserError(f"--spacing={spacing} must be at least --scored={scored} (scored stretches may not overlap)")
    needed = longest + (segments - 1) * spacing
    if needed > n_tokens:
        raise UserError(f"the text has {n_tokens} tokens, too few for {segments} segments {spacing} tokens apart "
                        f"after a first window of {longest} (needs {needed}); lower --segments or the lengths")
    return [longest + i * spacing for i in range(segments)]


def check_curve(lengths: Sequence[int], scored: int) -> List[int]:
    lengths = sorted(set(lengths))
    if not lengths:
        raise UserError("--lengths is empty")
    if scored < 1:
        raise UserError(f"--scored must be at least 1, got {scored}")
    if scored >= lengths[0]:
        raise UserError(f"--scored={scored} must be below the shortest length, {lengths[0]} (every scored token needs "
                        "context, and the first token of a window has none)")
    return lengths


def length_curve(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    dataset: str,
    lengths: Sequence[int],
    scored: int = 128,
    segments: int = 32,
    spacing: Optional[int] = None,
    batch_size: int = 1,
) -> Dict:
    """The perplexity of the same scored tokens at each context length in ``lengths`` (already checked against the
    model's window): ``{"ends": ..., "points": [Point, ...]}``."""
    lengths = check_curve(lengths, scored)
    ends = segment_ends(tokens.numel(), lengths[-1], scored, segments, spacing)
    points = []
    for length in lengths:
        windows = [Window(end - length, end, end - scored) for end in ends]
        t0 = time.perf_counter()
        nll_sum, count = score_windows(model, tokens, windows, batch_size)
        nll = nll_sum / count
        points.append(Point(dataset, length, math.exp(nll), nll, count, time.perf_counter() - t0))
    return {"ends": ends, "points": points}


def write_csv(path: Path, points: Sequence[Point]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    return path


def plot_curves(reports: Sequence[Dict], labels: Sequence[str], path: Path) -> Path:
    """Perplexity against context length, one panel per dataset, one line per report (log-log axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(p["dataset"] for r in reports for p in r["points"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for report, label in zip(reports, labels):
            points = [p for p in report["points"] if p["dataset"] == dataset]
            if points:
                ax.plot([p["context"] for p in points], [p["perplexity"] for p in points], "o-", label=label,
                        markersize=3, linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # models far apart in level; the slope is what matters
        contexts = sorted({p["context"] for r in reports for p in r["points"] if p["dataset"] == dataset})
        ax.set_xticks(contexts, [str(n) for n in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity of the same scored tokens")
        first = next(r for r in reports if any(p["dataset"] == dataset for p in r["points"]))
        ax.set_title(f"{dataset}: {first['segments']} x {first['scored']} scored tokens", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
