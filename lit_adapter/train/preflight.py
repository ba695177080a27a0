"""Everything a run can check before it does any work, so a mistake costs seconds and loses nothing.

A fine-tuning run calls these before it builds the model: the hardware options (:func:`check_fabric_args`: a
precision Lightning knows, an accelerator that is there, at least one device), the output folder
(:func:`claim_out_dir`: not a file, not another live run's, not a finished or resumable run unless ``--resume`` or
``--overwrite`` says what to do with it), and that the parts fit together (:func:`check_parts_fit`: the prepared
data's vocabulary and token ids against the model's, the checkpoint's tokenizer against the model, and a
tokenizer to copy where ``final/`` is a whole checkpoint). Each problem is one :class:`UserError` line that names
the option or file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from lit_adapter.errors import UserError

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
LOCK_FILE = ".lock"
RUN_OUTPUTS = ("last.ckpt", "final", "best", "summary.json", "generations.jsonl")
"""What a started or finished run leaves in its ``out_dir`` (``--overwrite true`` removes exactly these)."""


def check_fabric_args(accelerator: str, devices: int, precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"fabric.precision={precision!r} is not a precision; choose one of {', '.join(PRECISIONS)}")
    if accelerator not in ACCELERATORS:
        raise UserError(f"fabric.accelerator={accelerator!r} is not an accelerator; choose one of "
                        f"{', '.join(ACCELERATORS)}")
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise UserError(f"fabric.accelerator={accelerator} but no CUDA device is available here; use "
                        "--fabric.accelerator cpu (or auto)")
    if accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("fabric.accelerator=mps but MPS is not available here; use --fabric.accelerator cpu")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise UserError(f"fabric.devices must be a whole number >= 1, got {devices!r}")
    if accelerator == "cpu" and devices > (os.cpu_count() or 1):
        raise UserError(f"fabric.devices={devices} CPU processes but this machine has {os.cpu_count()} cores; use at "
                        f"most {os.cpu_count()}, or more machines with --fabric.num_nodes")
    if accelerator in ("cuda", "gpu") and devices > torch.cuda.device_count():
        raise UserError(f"fabric.devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


class OutDirLock:
    """``out_dir/.lock`` holding this process's id while a run is live. A second run into the same folder is
    refused; a lock left by a process that no longer exists (killed with SIGKILL) is taken over."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "OutDirLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise UserError(f"{self.path.parent} is in use by another run (process {pid}); wait for it, "
                                    "or choose another --out_dir") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise UserError(f"cannot lock {self.path.parent}: {self.path} keeps reappearing")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> OutDirLock:
    """Creates and locks ``out_dir`` for a run; refuses to silently replace what an earlier run left there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    if resume and overwrite:
        raise UserError("--resume true continues the run in out_dir and --overwrite true replaces it; pass one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out_dir {out_dir}: {err.strerror or err}") from None
    lock = OutDirLock(out_dir).acquire()
    try:
        found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
        if found and not resume:
            if not overwrite:
                raise UserError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume true to continue "
                                "it, --overwrite true to replace it, or choose another --out_dir")
            for name in found:
                target = out_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def check_parts_fit(config, checkpoint_dir: Path, data_dir: Path, metadata: Dict[str, Any],
                    splits: Dict[str, List[Dict[str, torch.Tensor]]], needs_tokenizer: bool) -> None:
    """The data, the tokenizer and the model agree, before the first forward (where a mismatch is an IndexError)."""
    from lit_adapter.data.tokenizer import TOKENIZER_FILE, has_tokenizer

    recorded = (metadata.get("tokenizer") or {}).get("vocab_size")
    if recorded is not None and recorded > config.vocab_size:
        raise UserError(f"{data_dir} was prepared with a tokenizer of {recorded} tokens, but the model in "
                        f"{checkpoint_dir} has a vocabulary of {config.vocab_size}; prepare the data again with "
                        f"--checkpoint_dir {checkpoint_dir}")
    for name, examples in splits.items():
        largest = max((int(ex["input_ids"].max()) for ex in examples if ex["input_ids"].numel()), default=-1)
        if largest >= config.vocab_size:
            raise UserError(f"the {name} split of {data_dir} holds token id {largest}, outside the model's vocabulary "
                            f"of {config.vocab_size}; prepare the data again with --checkpoint_dir {checkpoint_dir}")
    if has_tokenizer(checkpoint_dir):  # tokenizer.model, or a BPE tokenizer's files (GPT-2, Llama 3)
        check_tokenizer_fits(Path(checkpoint_dir), config, checkpoint_dir)
    elif needs_tokenizer:
        raise UserError(f"{checkpoint_dir} has no {TOKENIZER_FILE} (nor tokenizer.json or vocab.json + merges.txt), "
                        "which this method's final/ (a whole checkpoint "
                        "folder) must include; copy the base's tokenizer there first")


def check_tokenizer_fits(tokenizer_or_path, config, checkpoint_dir: Optional[Path] = None) -> None:
    """A tokenizer with more pieces than the model has embeddings would produce ids the model cannot look up."""
    from lit_adapter.data.tokenizer import Tokenizer

    tokenizer = tokenizer_or_path if isinstance(tokenizer_or_path, Tokenizer) else Tokenizer(tokenizer_or_path)
    if tokenizer.vocab_size > config.vocab_size:
        where = f" in {checkpoint_dir}" if checkpoint_dir is not None else ""
        raise UserError(f"the tokenizer{where} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                        f"{config.vocab_size}: they belong to different checkpoints")
