"""Evaluation of base and fine-tuned checkpoints: perplexity, in-context classification, MMLU, lm-eval-harness.

Every evaluation loads its model the same way (:func:`load_model`: a base checkpoint plus an optional fine-tuned
``final/`` folder, optionally quantized), scores token log-likelihoods with the batched primitive in
:mod:`lit_adapter.evaluation.perplexity`, and writes its numbers with :func:`write_json` together with
:func:`run_info` (machine, torch version, commit), so a number in a report can be traced back to its run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from lit_adapter.errors import UserError, require_folder
from lit_adapter.runtime import cpu_model, resolve_device, resolve_precision  # noqa: F401 (used by the evaluation scripts)

DEFAULT_DATA_DIR = Path(
    os.environ.get("LIT_ADAPTER_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
"""``../shared/data`` beside the checkout (or ``$LIT_ADAPTER_SHARED_DATA``): the offline copies of the data."""


def load_model(
    checkpoint_dir: Union[str, Path],
    adapter_dir: Optional[Union[str, Path]] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    rope_scaling: Optional[Dict[str, Any]] = None,
    attention=None,
):
    """``(config, model, tokenizer, spec, device)`` for evaluation: the base, plus the fine-tuned tensors if any.

    A fine-tuned run's RoPE scaling and attention pattern come from its ``adapter_config.json``; ``rope_scaling``
    and ``attention`` (an ``AttentionConfig``) replace them, see :func:`lit_adapter.tuners.registry.load_finetuned`.
    """
    from lit_adapter.tuners.registry import load_finetuned
    from lit_adapter.train.preflight import check_tokenizer_fits
    from lit_adapter.runtime import weights_dtype
    from lit_adapter.data.tokenizer import Tokenizer

    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    checkpoint_dir = Path(checkpoint_dir)
    require_folder(checkpoint_dir)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise UserError(f"adapter directory not found: {adapter_dir}")
    tokenizer = Tokenizer.from_checkpoint_dir(checkpoint_dir)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    config, model, spec = load_finetuned(checkpoint_dir, adapter_dir, dev, weights_dtype(precision), quantize,
                                         rope_scaling, attention)
    check_tokenizer_fits(tokenizer, config, checkpoint_dir)
    return config, model.eval(), tokenizer, spec, dev


def git_revision() -> str:
    """Short commit hash of the checkout this code runs from ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_info(device: torch.device) -> Dict[str, Any]:
    """Where and with what a number was measured."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "git": git_revision(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Union[str, Path], obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return path


def describe_model(checkpoint_dir: Union[str, Path], adapter_dir: Optional[Union[str, Path]], spec) -> Dict[str, Any]:
    """The model of a report: its base, its fine-tuned folder and the method (``base`` without one)."""
    if adapter_dir is None:
        method = "base" + (f" ({spec.quantize})" if spec.quantize else "")
    else:
        method = spec.describe()
    return {
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
        "method": method,
    }


def split_names(value: Union[str, Sequence[str]], what: str) -> List[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (jsonargparse gives either, depending on how it is passed)."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",")]
    else:
        names = [str(v).strip() for v in value]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"no {what} given")
    return names
