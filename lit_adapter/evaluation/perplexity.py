"""Perplexity on wikitext-2, PTB and C4 with the protocol of GPTQ-style evaluations, and batched log-likelihoods.

Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(https://arxiv.org/abs/2210.17323), ``datautils.py``; SparseGPT, AWQ, LLM-QAT and most PEFT/quantization papers
report the same numbers. A test corpus is turned into one string, tokenized once (one BOS at the very start, as
the HF LLaMA tokenizer does, none in between) and cut into windows:

* wikitext-2: the ``wikitext-2-raw-v1`` test rows joined with ``"\\n\\n"``.
* PTB: the ``ptb_text_only`` test sentences joined with ``" "`` (GPTQ's ``ptb_new``; its older ``ptb`` variant used
  the validation split joined with ``"\\n\\n"``). The HF loader strips every line of Mikolov's ``ptb.test.txt``
  (lines start with a space and end with ``" \\n"``), so a local copy is read the same way.
* C4: the first 1,100 documents of the English validation shard ``c4-validation.00000-of-00008.json.gz`` joined
  with ``" "`` and cut to the first ``256 * seqlen`` tokens (GPTQ's ``c4_new``).

Non-overlapping windows of ``seqlen`` tokens (the incomplete tail is dropped) score every token of a window except
the first, which has no context: ``exp`` of the mean negative log-likelihood over all scored tokens. Because every
window scores the same number of tokens this equals GPTQ's ``exp(mean of window losses)``. With ``stride`` the
windows slide as in the Hugging Face perplexity guide: window ``i`` starts at ``i * stride``, sees up to
``seqlen`` tokens and scores only the tokens no earlier window scored, so most tokens get ``seqlen - stride``
tokens of context (a lower, more faithful perplexity, at ``seqlen / stride`` times the compute).

:func:`token_logprobs` is the batched primitive the other evaluations share: sequences of different lengths are
right-padded into one batch, which a causal model cannot see (no position attends to a later one).
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from lit_adapter.errors import UserError, refuse_file_as_out_dir
from lit_adapter.model.rope import context_error

DATASETS = ("wikitext2", "ptb", "c4")
C4_DOCUMENTS = 1100
C4_WINDOWS = 256

_HUB = {
    "wikitext2": "wikitext / wikitext-2-raw-v1, split test",
    "ptb": "ptb_text_only / penn_treebank, split test",
    "c4": "allenai/c4, en/c4-validation.00000-of-00008.json.gz, split validation",
}
_LOCAL = {  # under --data_dir, in order of preference
    "wikitext2": ("wikitext-2-raw/wiki.test.joined.txt", "wikitext-2-raw/wiki.test.rows.jsonl"),
    "ptb": ("ptb/ptb.test.txt",),
    "c4": ("c4/c4-validation.00000-of-00008.json.gz", "c4/c4-train.00000-of-01024.first1000.json.gz"),
}


# ----------------------------------------------------------------------------------------------------------------------
# corpora


@dataclass
class Corpus:
    name: str
    text: str
    source: str
    """The hub dataset or the local file the text came from."""
    note: str = ""
    """Anything that makes the number differ from the published protocol (e.g. a different C4 shard)."""


def load_corpus(name: str, data_dir: Optional[Union[str, Path]] = None) -> Corpus:
    """The test text of ``name`` (one of :data:`DATASETS`) from ``data_dir``, or from the Hugging Face hub."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if data_dir is not None:
        return _load_local(name, Path(data_dir))
    return _load_hub(name)


def _load_local(name: str, data_dir: Path) -> Corpus:
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} does not exist (needed for the {name} dataset)")
    for relative in _LOCAL[name]:
        path = data_dir / relative
        if path.is_file():
            return _read_local(name, path)
    wanted = " or ".join(str(data_dir / r) for r in _LOCAL[name])
    raise UserError(
        f"dataset {name}: no local copy found (looked for {wanted}); put the file there, point --data_dir to the "
        f"folder that holds it, or leave out --data_dir to download {_HUB[name]} from the Hugging Face hub"
    )


def _read_local(name: str, path: Path) -> Corpus:
    try:
        if name == "wikitext2" and path.suffix == ".jsonl":
            rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
            return Corpus(name, "\n\n".join(rows), str(path))
        if name == "wikitext2":
            # newline="" keeps the file's own line endings: the joined text must be byte-identical to the HF rows
            with open(path, encoding="utf-8", newline="") as f:
                return Corpus(name, f.read(), str(path))
        if name == "ptb":
            with open(path, encoding="utf-8") as f:
                return Corpus(name, " ".join(line.strip() for line in f), str(path))
        texts = _read_c4_documents(path, C4_DOCUMENTS)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as err:
        raise UserError(f"dataset {name}: cannot read {path}: {type(err).__name__}: {err}") from None
    note = ""
    if "validation" not in path.name:
        note = (
            f"C4 text from {path.name}, NOT the validation shard c4-validation.00000-of-00008 of the GPTQ protocol "
            f"({len(texts)} documents): not comparable with published C4 perplexities"
        )
    return Corpus(name, " ".join(texts), str(path), note)


def _read_c4_documents(path: Path, limit: int) -> List[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if len(texts) == limit:
                break
    return texts


def _load_hub(name: str) -> Corpus:
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return Corpus(name, "\n\n".join(rows["text"]), f"hub: {_HUB[name]}")
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split="test")
            return Corpus(name, " ".join(rows["sentence"]), f"hub: {_HUB[name]}")
        rows = load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        return Corpus(name, " ".join(rows[:C4_DOCUMENTS]["text"]), f"hub: {_HUB[name]}")
    except Exception as err:  # offline, hub down, dataset renamed: all end the same way for the user
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"dataset {name}: cannot load {_HUB[name]} from the Hugging Face hub ({type(err).__name__}: "
            f"{first_line}); offline? pass --data_dir with a local copy ({' or '.join(_LOCAL[name])})"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# windows and scoring


@dataclass(frozen=True)
class Window:
    """``tokens[begin:end]`` go through the model; the targets ``tokens[score_from:end]`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def make_windows(
    n_tokens: int, seqlen: int, stride: Optional[int] = None, max_windows: Optional[int] = None
) -> List[Window]:
    """Non-overlapping windows of ``seqlen`` (the incomplete tail dropped), or sliding ones ``stride`` apart."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (one context token and one scored token), got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max_windows must be at least 1, got {max_windows}")
    if stride is None:
        windows = [Window(b, b + seqlen, b + 1) for b in range(0, n_tokens - seqlen + 1, seqlen)]
    else:
        if not 1 <= stride <= seqlen:
            raise UserError(f"--stride must be between 1 and --seqlen={seqlen}, got {stride}")
        windows, scored_until = [], 1  # the first token has no context and is never scored
        for begin in range(0, n_tokens, stride):
            end = min(begin + seqlen, n_tokens)
            if end - begin < 2:
                break
            windows.append(Window(begin, end, max(scored_until, begin + 1)))
            scored_until = end
            if end == n_tokens:
                break
    if not windows:
        raise UserError(f"the text has only {n_tokens} tokens, too few for one window of --seqlen={seqlen}")
    return windows[:max_windows] if max_windows is not None else windows


def right_pad(sequences: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(B, longest)`` token ids, each sequence followed by zeros (no earlier position of a causal model sees them)."""
    longest = max(s.numel() for s in sequences)
    batch = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        batch[i, : s.numel()] = s
    return batch


@torch.inference_mode()
def token_logprobs(model: torch.nn.Module, sequences: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``log p(x_t | x_<t)`` for ``t = 1 .. len-1`` of each 1-D sequence, in one right-padded forward pass.

    Returned in float32 on the CPU, one ``(len - 1,)`` tensor per sequence.
    """
    device = next(model.parameters()).device
    batch = right_pad(sequences, device)  # (B, T)
    logits = model(batch)  # (B, T, V)
    out = []
    for i, s in enumerate(sequences):
        n = s.numel()
        logp = F.log_softmax(logits[i, : n - 1].float(), dim=-1)  # (n-1, V): one sequence at a time, in float32
        out.append(logp.gather(-1, batch[i, 1:n, None]).squeeze(-1).cpu())
    return out


@torch.inference_mode()
def next_token_logits(model: torch.nn.Module, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits ``(B, V)`` (float32, CPU) for the token after the last one of each 1-D sequence, right-padded."""
    device = next(model.parameters()).device
    batch = right_pad(sequences, device)
    logits = model(batch)  # (B, T, V)
    last = torch.tensor([s.numel() - 1 for s in sequences], device=device)
    return logits[torch.arange(len(sequences), device=device), last].float().cpu()


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]]
) -> List[Tuple[float, bool]]:
    """For each ``(context, continuation)`` pair of token lists, in one right-padded forward pass: the summed
    ``log p(continuation | context)`` and whether greedy decoding would produce exactly the continuation.

    The model sees ``context + continuation[:-1]`` (the last token is only predicted), so a pair fits the context
    window when ``len(context) + len(continuation) - 1 <= block_size``.
    """
    device = next(model.parameters()).device
    inputs = [torch.tensor(list(ctx) + list(cont)[:-1]) for ctx, cont in pairs]
    logits = model(right_pad(inputs, device))  # (B, T, V)
    out = []
    for row, (inp, (_, cont)) in enumerate(zip(inputs, pairs)):
        n, cont = inp.numel(), torch.tensor(list(cont))
        logp = F.log_softmax(logits[row, n - cont.numel() : n].float(), dim=-1).cpu()  # (C, V)
        total = logp.gather(-1, cont[:, None]).double().sum().item()
        out.append((total, bool((logp.argmax(-1) == cont).all())))
    return out


def _batches(windows: List[Window], batch_size: int) -> List[List[Window]]:
    # consecutive windows of the same length share a batch (only the last sliding window can be shorter)
    batches: List[List[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            batches.append([w])
    return batches


def score_windows(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    windows: List[Window],
    batch_size: int = 1,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Tuple[float, int]:
    """Summed negative log-likelihood (float64) and count of the scored tokens of ``windows`` over ``tokens``."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size):
        logprobs = token_logprobs(model, [tokens[w.begin : w.end] for w in batch])
        for w, lp in zip(batch, logprobs):
            # lp[j] scores token begin + 1 + j
            scored = lp[w.score_from - w.begin - 1 :]
            total -= scored.double().sum().item()
            count += scored.numel()
        if on_batch is not None:
            on_batch(sum(w.end - w.begin for w in batch))
    return total, count


@dataclass
class PerplexityResult:
    dataset: str
    source: str
    note: str
    perplexity: float
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens_scored: int
    windows: int
    seqlen: int
    stride: Optional[int]
    corpus_tokens: int
    tokens_processed: int
    """Tokens that went through the model (more than ``tokens_scored`` with a stride)."""
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> Dict:
        return asdict(self)

    def summary(self) -> str:
        mode = f"stride {self.stride}" if self.stride else "non-overlapping"
        return (
            f"{self.dataset}: perplexity {self.perplexity:.4f} | {self.windows} windows of {self.seqlen} tokens "
            f"({mode}) | {self.tokens_scored} tokens scored | {self.seconds:.2f} s | "
            f"{self.tokens_per_second:.1f} tokens/s"
        )


def tokenize_corpus(tokenizer, corpus: Corpus, bos: bool = True) -> torch.Tensor:
    tokens = tokenizer.encode(corpus.text, bos=bos)
    if tokens.numel() < 2:
        raise UserError(f"dataset {corpus.name}: the text from {corpus.source} is empty")
    return tokens


def evaluate_corpus(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    corpus: Corpus,
    seqlen: int,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on the tokenized ``corpus`` (see the module docstring for the protocol)."""
    config = getattr(model, "config", None)
    block_size = getattr(config, "block_size", None)
    virtual = getattr(model, "num_virtual_tokens", 0)
    if block_size is not None and seqlen > block_size:
        raise UserError(context_error(block_size, getattr(config, "rope_scaling", None), seqlen, "--seqlen"))
    if block_size is not None and seqlen > block_size - virtual:
        raise UserError(f"--seqlen={seqlen} and the adapter's {virtual} virtual tokens exceed the model's window, "
                        f"block_size={block_size}; use --seqlen {block_size - virtual} or less")
    if corpus.name == "c4":
        tokens = tokens[: C4_WINDOWS * seqlen]
    windows = make_windows(tokens.numel(), seqlen, stride, max_windows)
    processed = sum(w.end - w.begin for w in windows)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=processed, desc=corpus.name, unit="tok", unit_scale=True, file=sys.stderr, mininterval=1.0)
    t0 = time.perf_counter()
    try:
        nll_sum, count = score_windows(model, tokens, windows, batch_size, on_batch=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    nll = nll_sum / count
    return PerplexityResult(
        dataset=corpus.name, source=corpus.source, note=corpus.note, perplexity=math.exp(nll), nll=nll,
        tokens_scored=count, windows=len(windows), seqlen=seqlen, stride=stride, corpus_tokens=tokens.numel(),
        tokens_processed=processed, seconds=seconds, tokens_per_second=processed / max(seconds, 1e-9),
    )


def run_perplexity(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    datasets: Union[str, Sequence[str]] = "wikitext2,ptb,c4",
    seqlen: Optional[int] = None,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    data_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    bos: bool = True,
    progress: bool = True,
    rope_scaling: Optional[Dict] = None,
    attention=None,
) -> Dict:
    """Loads the model, evaluates every dataset, prints one line each and writes ``out_dir/perplexity.json``.

    ``rope_scaling`` extends the base's window and ``attention`` (an ``AttentionConfig``) sets the attention
    pattern; a fine-tuned run brings its own of both (see ``evaluation.load_model``), which they replace.
    """
    from lit_adapter.evaluation import describe_model, load_model, run_info, split_names, write_json
    from lit_adapter.runtime import peak_memory_gb

    names = split_names(datasets, "datasets")
    for name in names:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    refuse_file_as_out_dir(out_dir, "perplexity.json")  # before minutes of work
    corpora = [load_corpus(name, data_dir) for name in names]  # data problems surface before the model loads
    config, model, tokenizer, spec, dev = load_model(checkpoint_dir, adapter_dir, quantize, precision, device,
                                                     rope_scaling, attention)
    from lit_adapter.generation.decode import real_window

    seqlen = seqlen if seqlen is not None else min(real_window(model), 2048)

    results = []
    for corpus in corpora:
        tokens = tokenize_corpus(tokenizer, corpus, bos=bos)
        result = evaluate_corpus(model, tokens, corpus, seqlen, stride, max_windows, batch_size, progress)
        print(result.summary())
        if result.note:
            print(f"  note: {result.note}")
        results.append(result)

    report = {
        **describe_model(checkpoint_dir, adapter_dir, spec),
        "seqlen": seqlen, "stride": stride, "max_windows": max_windows, "batch_size": batch_size, "bos": bos,
        "window": config.block_size, "rope_scaling": config.rope_scaling, "attention": spec.attention.pattern,
        "results": {r.dataset: r.to_dict() for r in results},
        "peak_memory_gb": peak_memory_gb(dev),
        "run": run_info(dev),
    }
    if out_dir is not None:
        path = write_json(Path(out_dir) / "perplexity.json", report)
        print(f"wrote {path}")
    return report
