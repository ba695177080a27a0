"""Passkey retrieval: does the model find a number hidden deep in a long, boring prompt?

The test of Landmark Attention (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300) and LongLoRA (Chen et
al. 2023, https://arxiv.org/abs/2309.12307, ``passkey_retrivial.py``), with their prompt: a task description, filler
text ("The grass is green. The sky is blue. ..."), the line "The pass key is K. Remember it. K is the pass key.",
more filler, and "What is the pass key? The pass key is", the five parts joined with newlines. LongLoRA draws the
filler split at random; here the split is a chosen *depth* (the fraction of the filler before the key, 0 = right
after the task description, 1 = right before the question), so accuracy is reported per (length, depth) cell, as
needle-in-a-haystack heatmaps do. The filler is cut by characters, as LongLoRA cuts it, to the most that keeps the
prompt and its answer within the cell's length in tokens (a length is what the window must hold: prompt + answer).

Two numbers per cell:

* **accuracy**: the model's greedy answer (as many tokens as the key's) equals the key's tokens, LongLoRA's measure;
* **candidate rank**: the summed log-likelihood of the true key's tokens ranked among ``distractors`` other random
  keys of as many digits, in the same prompt. A model that cannot retrieve scores chance here (top-1 = 1/(n+1),
  mean rank = (n+2)/2, margin 0), a measured "chance" instead of an uninformative 0% accuracy, and a model that
  half-retrieves scores above it before its greedy answer is ever exactly right.

Every (length, depth, trial) draws its own seeded key and distractors. The rank's chance level holds in expectation
over the draws (no key is more likely to be the true one), so it needs many keys: a small model prefers some digit
strings to others, and with one key per trial reused in every cell, a few keys' luck would read as a retrieval
effect (at 4 trials, stories260K's true keys ranked below chance in every cell, all for the same 4 keys).
"""

from __future__ import annotations

import csv
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from lit_adapter.errors import UserError
from lit_adapter.evaluation.perplexity import continuation_logprobs
from lit_adapter.model.rope import context_error

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def information_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass
class PasskeyPrompt:
    """One prompt: ``tokens`` (with BOS) then ``answer``; the key's line starts at token ``key_position``."""

    text: str
    tokens: torch.Tensor
    answer: List[int]
    key: str
    key_position: int
    filler_chars: int
    """Characters of filler in all (before + after the key)."""
    depth: float

    @property
    def length(self) -> int:
        """Tokens the window must hold: the prompt and the answer."""
        return self.tokens.numel() + len(self.answer)


def _text(filler_chars: int, depth: float, key: str) -> tuple:
    """LongLoRA's prompt with ``filler_chars`` of filler, ``depth`` of it before the key; and where the key's line
    starts (in characters). Both filler parts are cut from the start of the repeated filler, as LongLoRA cuts them."""
    before = round(depth * filler_chars)
    repeated = " ".join([FILLER] * (filler_chars // (len(FILLER) + 1) + 1))
    head = "\n".join([TASK, repeated[:before], ""])
    return head + "\n".join([information_line(key), repeated[: filler_chars - before], QUESTION]), len(head)


def answer_tokens(tokenizer, prompt_text: str, prompt: List[int], key: str) -> List[int]:
    """The key's tokens as they follow the prompt (" K" in context, so a BPE vocabulary gets its space-led piece);
    LongLoRA's standalone ``encode(K)`` where the prompt's own tokens do not survive the concatenation."""
    full = tokenizer.encode(prompt_text + " " + key, bos=True).tolist()
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        return full[len(prompt):]
    return tokenizer.encode(key, bos=False).tolist()


def make_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The prompt of ``length`` tokens at most (prompt + answer) with the most filler that fits, the key at ``depth``.

    The filler is found by bisection on its characters; tokens grow with characters (up to a token where a cut
    word splits differently), so the result is the longest or within a few characters of it.
    """
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"--depths must lie between 0 and 1 (the fraction of filler before the key), got {depth}")

    def build(chars: int) -> PasskeyPrompt:
        text, key_char = _text(chars, depth, key)
        ids = tokenizer.encode(text, bos=True).tolist()
        answer = answer_tokens(tokenizer, text, ids, key)
        # the first token that ends past the key line's first character (token_spans are UTF-8 byte offsets)
        key_byte = len(text[:key_char].encode("utf-8"))
        spans = tokenizer.token_spans(text)
        offset = len(ids) - len(spans)  # BOS
        position = offset + next(i for i, (_, end) in enumerate(spans) if end > key_byte)
        return PasskeyPrompt(text, torch.tensor(ids), answer, key, position, chars, depth)

    smallest = build(0)
    if smallest.length > length:
        raise UserError(f"--lengths {length} is too short for the passkey prompt, which takes {smallest.length} tokens "
                        "with no filler at all; use longer lengths")
    low, high = 0, 4 * length
    while build(high).length <= length:  # a vocabulary of whole words packs more than 4 characters into a token
        low, high = high, 2 * high
    while low < high:
        mid = (low + high + 1) // 2
        if build(mid).length <= length:
            low = mid
        else:
            high = mid - 1
    return build(low)


def draw_keys(seed: int, cell: str, digits: int, distractors: int) -> List[str]:
    """The key of a trial (``cell`` names it, e.g. ``"2048/0.5/3"``), then ``distractors`` other keys: distinct
    numbers of ``digits`` digits (no leading zero). The key does not depend on the number of distractors."""
    if digits < 1:
        raise UserError(f"--digits must be at least 1, got {digits}")
    if distractors < 0:
        raise UserError(f"--distractors must be 0 or more, got {distractors}")
    if distractors + 1 > 9 * 10 ** (digits - 1):
        raise UserError(f"--distractors={distractors} leaves no other {digits}-digit key to draw")
    rng = random.Random(f"passkey/{seed}/{cell}")
    keys: List[str] = []
    while len(keys) < distractors + 1:
        key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if key not in keys:
            keys.append(key)
    return keys


# ----------------------------------------------------------------------------------------------------------------------
# answering and scoring


@torch.inference_mode()
def greedy_answer(model: torch.nn.Module, prompt: torch.Tensor, n_tokens: int) -> List[int]:
    """``n_tokens`` greedily decoded tokens: with the KV cache where the model has one (every ``GPT``), else by one
    full forward per token (any causal LM module that maps ``(B, T)`` ids to ``(B, T, V)`` logits; LongLoRA's
    ``use_cache=False`` path)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    if hasattr(model, "set_kv_cache"):
        from lit_adapter.generation.decode import generate_batch

        return generate_batch(model, [prompt], n_tokens, temperature=0.0)[0]
    ids = prompt.clone()
    for _ in range(n_tokens):
        ids = torch.cat([ids, model(ids[None])[0, -1].argmax().view(1)])
    return ids[prompt.numel():].tolist()


@dataclass
class Trial:
    length: int
    depth: float
    trial: int
    key: str
    tokens: int
    """Tokens of the prompt and the answer: ``length`` or a few less (the filler is cut by characters)."""
    key_position: int
    answer: str
    """The model's greedy answer, decoded."""
    correct: bool
    logprob: float
    """Summed log-likelihood of the true key's tokens."""
    rank: int
    """1 + the number of distractors at least as likely as the true key."""
    margin: float
    """``logprob`` minus the distractors' mean summed log-likelihood."""


def run_trial(model, tokenizer, prompt: PasskeyPrompt, distractors: Sequence[str], length: int, trial: int) -> Trial:
    """Generates the answer and ranks the true key's likelihood among the distractors' in one batch."""
    context = prompt.tokens.tolist()
    candidates = [prompt.answer] + [answer_tokens(tokenizer, prompt.text, context, d) for d in distractors]
    scored = continuation_logprobs(model, [(context, c) for c in candidates])
    generated = greedy_answer(model, prompt.tokens, len(prompt.answer))
    true_lp = scored[0][0]
    others = [lp for lp, _ in scored[1:]]
    return Trial(
        length=length, depth=prompt.depth, trial=trial, key=prompt.key, tokens=prompt.length,
        key_position=prompt.key_position, answer=tokenizer.decode(generated), correct=generated == prompt.answer,
        logprob=true_lp, rank=1 + sum(lp >= true_lp for lp in others),
        margin=true_lp - sum(others) / len(others) if others else 0.0,
    )


@dataclass
class Cell:
    length: int
    depth: float
    trials: int
    accuracy: float
    top1: float
    """Fraction of trials where the true key beats every distractor (chance: 1 / (distractors + 1))."""
    mean_rank: float
    mean_margin: float
    mean_tokens: float
    mean_key_position: float


def summarize(trials: Sequence[Trial]) -> List[Cell]:
    """One cell per (length, depth), in the order the trials came."""
    groups: Dict[tuple, List[Trial]] = {}
    for t in trials:
        groups.setdefault((t.length, t.depth), []).append(t)
    cells = []
    for (length, depth), ts in groups.items():
        n = len(ts)
        cells.append(Cell(
            length=length, depth=depth, trials=n, accuracy=sum(t.correct for t in ts) / n,
            top1=sum(t.rank == 1 for t in ts) / n, mean_rank=sum(t.rank for t in ts) / n,
            mean_margin=sum(t.margin for t in ts) / n, mean_tokens=sum(t.tokens for t in ts) / n,
            mean_key_position=sum(t.key_position for t in ts) / n,
        ))
    return cells


def default_lengths(window: int, shortest: int = 256) -> List[int]:
    """``shortest``, doubling, up to and including the window."""
    lengths, n = [], shortest
    while n < window:
        lengths.append(n)
        n *= 2
    return lengths + [window]


def check_lengths(model, lengths: Sequence[int], what: str = "--lengths") -> None:
    """Every length within the model's (scaled) window: one error line past it, never a silent cap."""
    from lit_adapter.generation.decode import real_window

    config = model.config
    window = real_window(model)
    for length in lengths:
        if length > config.block_size:
            raise UserError(context_error(config.block_size, getattr(config, "rope_scaling", None), length, what))
        if length > window:
            raise UserError(f"{what}={length} and the adapter's {config.block_size - window} virtual tokens exceed "
                            f"the model's window, block_size={config.block_size}; use {window} or less")
        if length < 2:
            raise UserError(f"{what} must be at least 2 tokens, got {length}")


def evaluate_passkey(
    model: torch.nn.Module,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    trials: int = 10,
    digits: int = 5,
    distractors: int = 9,
    seed: int = 0,
    progress: bool = False,
) -> Dict:
    """Every (length, depth, trial): the prompts, the answers and the scores; ``{"cells": ..., "trials": ...}``."""
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    check_lengths(model, lengths)
    draw_keys(seed, "", digits, distractors)  # bad settings fail before the first prompt
    out: List[Trial] = []
    t0, total = time.perf_counter(), len(lengths) * len(depths) * trials
    for length in lengths:
        for depth in depths:
            for i in range(trials):
                key, *others = draw_keys(seed, f"{length}/{depth:g}/{i}", digits, distractors)
                out.append(run_trial(model, tokenizer, make_prompt(tokenizer, length, depth, key), others, length, i))
                if progress:
                    print(f"\r  passkey {len(out)}/{total}, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return {"cells": [asdict(c) for c in summarize(out)], "trials": [asdict(t) for t in out]}


# ----------------------------------------------------------------------------------------------------------------------
# files


def write_csv(path: Path, rows: Sequence[Dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_heatmaps(reports: Sequence[Dict], labels: Sequence[str], path: Path) -> Path:
    """Accuracy (top row) and top-1 among the candidates (bottom row) by length and depth, one column per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(reports), figsize=(3.6 * len(reports) + 1.2, 6.6), squeeze=False,
                             layout="constrained")
    for col, (report, label) in enumerate(zip(reports, labels)):
        cells = report["cells"]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        chance = 1.0 / (report["distractors"] + 1)
        for row, (field, title) in enumerate([("accuracy", "greedy accuracy"),
                                              ("top1", f"top-1 of {report['distractors'] + 1} (chance {chance:.2f})")]):
            grid = torch.full((len(depths), len(lengths)), float("nan"))
            for c in cells:
                grid[depths.index(c["depth"]), lengths.index(c["length"])] = c[field]
            ax = axes[row][col]
            image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            for y in range(len(depths)):
                for x in range(len(lengths)):
                    ax.text(x, y, f"{grid[y, x]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_xlabel("length (tokens)", fontsize=8)
            ax.set_ylabel("depth of the key", fontsize=8)
            ax.set_title(f"{label}\n{title}" if row == 0 else title, fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
