"""The long-context evaluations of ``evaluate/long_context.py``: load a base or a fine-tuned run (with its own or a
given RoPE scaling), run passkey retrieval (:mod:`~lit_adapter.evaluation.passkey`) or the perplexity-by-context
curve (:mod:`~lit_adapter.evaluation.context_curve`), print the numbers and write them (JSON, CSV) with their plot.

Lengths default to 256, doubling, up to the model's window (its scaled window for a scaled model); a length past
the window is refused in one line that names the fix, never silently cut to fit.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lit_adapter.errors import UserError, refuse_file_as_out_dir
from lit_adapter.evaluation import context_curve, passkey

PASSKEY_FILES = ("passkey.json", "passkey.csv", "passkey.png")
CURVE_FILES = ("context_length.json", "context_length.csv", "context_length.png")


def _load(checkpoint_dir, adapter_dir, quantize, precision, device, rope_scaling, attention):
    from lit_adapter.evaluation import describe_model, load_model

    config, model, tokenizer, spec, dev = load_model(checkpoint_dir, adapter_dir, quantize, precision, device,
                                                     rope_scaling, attention)
    from lit_adapter.generation.decode import real_window

    about = {
        **describe_model(checkpoint_dir, adapter_dir, spec),
        "window": real_window(model), "rope_scaling": config.rope_scaling, "attention": spec.attention.pattern,
    }
    return model, tokenizer, dev, about


def _label(about: Dict) -> str:
    scaling = about.get("rope_scaling")
    scaled = f", {scaling['rope_type']} x{scaling['factor']:g}" if scaling else ""
    return f"{about['method']}{scaled}, {about['attention']}"


def run_passkey(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    lengths: Optional[Sequence[int]] = None,
    depths: Sequence[float] = passkey.DEPTHS,
    trials: int = 10,
    digits: int = 5,
    distractors: int = 9,
    seed: int = 0,
    out_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    rope_scaling: Optional[Dict] = None,
    attention=None,
    progress: bool = True,
) -> Dict:
    """Passkey retrieval over lengths x depths; prints the grid and writes ``PASSKEY_FILES`` to ``out_dir``."""
    from lit_adapter.evaluation import run_info, write_json
    from lit_adapter.runtime import peak_memory_gb

    refuse_file_as_out_dir(out_dir, "the results")  # before minutes of work
    if not depths:
        raise UserError("--depths is empty")
    model, tokenizer, dev, about = _load(checkpoint_dir, adapter_dir, quantize, precision, device, rope_scaling,
                                         attention)
    lengths = list(lengths) if lengths else passkey.default_lengths(about["window"])
    result = passkey.evaluate_passkey(model, tokenizer, lengths, depths, trials, digits, distractors, seed, progress)
    every = result["trials"]
    overall = {"trials": len(every), "accuracy": sum(t["correct"] for t in every) / len(every),
               "top1": sum(t["rank"] == 1 for t in every) / len(every),
               "mean_rank": sum(t["rank"] for t in every) / len(every),
               "mean_margin": sum(t["margin"] for t in every) / len(every)}
    report = {
        **about, "label": _label(about), "lengths": lengths, "depths": list(depths), "trials": trials,
        "digits": digits, "distractors": distractors, "seed": seed,
        "chance": {"accuracy": 0.0, "top1": 1 / (distractors + 1), "mean_rank": (distractors + 2) / 2,
                   "mean_margin": 0.0},
        "overall": overall, **result, "peak_memory_gb": peak_memory_gb(dev), "run": run_info(dev),
    }
    print(f"passkey retrieval, {trials} keys of {digits} digits per cell, {distractors} distractors "
          f"(top-1 by chance: {report['chance']['top1']:.2f}):")
    print(f"  {'length':>6} {'depth':>5} {'accuracy':>8} {'top-1':>5} {'rank':>5} {'margin':>7}")
    for c in report["cells"]:
        print(f"  {c['length']:>6} {c['depth']:>5.2f} {c['accuracy']:>8.2f} {c['top1']:>5.2f} {c['mean_rank']:>5.2f} "
              f"{c['mean_margin']:>7.3f}")
    print(f"  all {overall['trials']} trials: accuracy {overall['accuracy']:.3f}, top-1 {overall['top1']:.3f}, "
          f"mean rank {overall['mean_rank']:.2f}, margin {overall['mean_margin']:.3f}")
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / PASSKEY_FILES[0], report)
        passkey.write_csv(out_dir / PASSKEY_FILES[1], report["cells"])
        passkey.plot_heatmaps([report], [report["label"]], out_dir / PASSKEY_FILES[2])
        print(f"wrote {', '.join(str(out_dir / f) for f in PASSKEY_FILES)}")
    return report


def run_length_curve(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    datasets: str = "wikitext2,c4",
    lengths: Optional[Sequence[int]] = None,
    scored: int = 128,
    segments: int = 32,
    spacing: Optional[int] = None,
    batch_size: int = 1,
    data_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    rope_scaling: Optional[Dict] = None,
    attention=None,
) -> Dict:
    """The perplexity of the same tokens at growing context lengths, per dataset; writes ``CURVE_FILES``."""
    from lit_adapter.evaluation import run_info, split_names, write_json
    from lit_adapter.evaluation.perplexity import DATASETS, load_corpus, tokenize_corpus
    from lit_adapter.runtime import peak_memory_gb

    refuse_file_as_out_dir(out_dir, "the results")  # before minutes of work
    names = split_names(datasets, "datasets")
    for name in names:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if lengths:
        context_curve.check_curve(lengths, scored)  # before the model loads
    corpora = [load_corpus(name, data_dir) for name in names]
    model, tokenizer, dev, about = _load(checkpoint_dir, adapter_dir, quantize, precision, device, rope_scaling,
                                         attention)
    lengths = context_curve.check_curve(lengths or passkey.default_lengths(about["window"]), scored)
    passkey.check_lengths(model, lengths)
    points: List[context_curve.Point] = []
    ends: Dict[str, List[int]] = {}
    notes: Dict[str, str] = {}
    for corpus in corpora:
        tokens = tokenize_corpus(tokenizer, corpus)
        curve = context_curve.length_curve(model, tokens, corpus.name, lengths, scored, segments, spacing, batch_size)
        points += curve["points"]
        ends[corpus.name] = curve["ends"]
        if corpus.note:
            notes[corpus.name] = corpus.note
        for p in curve["points"]:
            print(f"{p.dataset}: context {p.context:>6}: perplexity {p.perplexity:.4f} ({p.tokens_scored} tokens "
                  f"scored, {p.seconds:.1f} s)")
    report = {
        **about, "label": _label(about), "lengths": lengths, "scored": scored, "segments": segments,
        "spacing": spacing, "notes": notes, "points": [asdict(p) for p in points], "segment_ends": ends,
        "peak_memory_gb": peak_memory_gb(dev), "run": run_info(dev),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / CURVE_FILES[0], report)
        context_curve.write_csv(out_dir / CURVE_FILES[1], points)
        context_curve.plot_curves([report], [report["label"]], out_dir / CURVE_FILES[2])
        print(f"wrote {', '.join(str(out_dir / f) for f in CURVE_FILES)}")
    return report


def plot_reports(reports: Sequence[Path], out: Path, labels: Optional[Sequence[str]] = None) -> Path:
    """One picture of several runs' ``passkey.json`` (heatmaps side by side) or ``context_length.json`` (curves)."""
    if not reports:
        raise UserError("--reports is empty")
    if labels is not None and len(labels) != len(reports):
        raise UserError(f"--labels has {len(labels)} names for {len(reports)} reports")
    loaded = []
    for path in reports:
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read report {path}: {type(err).__name__}: {err}") from None
    kinds = {"cells" in r for r in loaded}
    if len(kinds) > 1 or not all("cells" in r or "points" in r for r in loaded):
        raise UserError("--reports must all be passkey.json files or all context_length.json files")
    labels = list(labels) if labels is not None else [r.get("label", Path(p).parent.name) for r, p in
                                                       zip(loaded, reports)]
    plot = passkey.plot_heatmaps if "cells" in loaded[0] else context_curve.plot_curves
    path = plot(loaded, labels, Path(out))
    print(f"wrote {path}")
    return path
