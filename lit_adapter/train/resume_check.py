"""``--resume true`` continues the same computation, or it is refused before any work.

A resumable checkpoint holds tensors, not the settings that made them: LoRA's alpha, the attention pattern or the
quantization of the base change every later step without changing a shape, so loading alone cannot notice them,
and the run's record (``hparams.json``, ``final/adapter_config.json``) would then claim the new values for steps
taken with the old ones. :func:`check_resume` compares this command's settings with the ``hparams.json`` the run
wrote at its start and names each that differs as its option (``lora.alpha``, ``attention.pattern``,
``quantize``), beside the start-up checks, before the model is built.

What may change on resume is what does not change the steps already planned: how long to train (``max_steps``,
``epochs``), where to log and how often to validate, save or print, and the hardware it runs on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from lit_adapter.errors import UserError

RESUMABLE_CHANGES = ("out_dir", "logger", "eval", "fabric", "train.max_steps", "train.epochs", "train.log_interval",
                     "train.save_interval", "trainable_params", "total_params")
"""Settings (or groups of them) a resumed run may change: they do not alter the computation of a step."""
PATH_SETTINGS = ("checkpoint_dir", "data.data_dir")
"""Compared as resolved paths (``out/x`` and ``./out/x`` are the same folder)."""


def option_name(key: str, settings_group: str) -> str:
    """The command-line option of an ``hparams.json`` key: ``method.settings.alpha`` is ``--lora.alpha``."""
    if key.startswith("method.settings."):
        return f"{settings_group}.{key[len('method.settings.'):]}"
    if key.startswith("method.") and key != "method.method":
        return key[len("method."):]
    return "method" if key == "method.method" else key


def _same(key: str, old: Any, new: Any) -> bool:
    if key in PATH_SETTINGS and isinstance(old, str) and isinstance(new, str):
        return Path(old).resolve() == Path(new).resolve()
    return old == new


def changed_settings(recorded: Any, current: Any, settings_group: str, prefix: str = "") -> List[str]:
    """``option: old -> new`` for each computation-changing setting of ``current`` that differs from ``recorded``
    (a setting only one of them knows, from another version of this code, is not compared; a group set on one side
    and null on the other, such as ``model.rope_scaling``, is one change)."""
    if any(prefix == k or prefix.startswith(k + ".") for k in RESUMABLE_CHANGES):
        return []
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [change for key in current if key in recorded
                for change in changed_settings(recorded[key], current[key], settings_group,
                                               f"{prefix}.{key}" if prefix else str(key))]
    if _same(prefix, recorded, current):
        return []
    return [f"{option_name(prefix, settings_group)}: {json.dumps(recorded)} -> {json.dumps(current)}"]


def check_resume(out_dir: Path, hparams: Dict[str, Any], settings_group: str) -> None:
    """Refuses ``--resume true`` where ``out_dir`` has nothing to resume, or where this command would continue it
    with other settings than it was started with (one line naming each)."""
    from lit_adapter.tracking.results import to_jsonable
    from lit_adapter.train.trainer import CHECKPOINT_NAME

    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_NAME
    if not checkpoint.exists():  # a file, or a sharded checkpoint's folder (--fabric.strategy fsdp)
        raise UserError(f"--resume: no checkpoint at {checkpoint}; run without --resume to start afresh")
    recorded_path = out_dir / "hparams.json"
    if not recorded_path.is_file():
        return  # a run of an older version: its shapes are still checked when the checkpoint loads
    try:
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--resume: cannot read {recorded_path} ({err}); it records how the run was started") from None
    changes = changed_settings(recorded, json.loads(json.dumps(to_jsonable(hparams))), settings_group)
    if changes:
        raise UserError(f"--resume: {out_dir} was started with other settings ({'; '.join(changes)}); resume with "
                        "the same ones, or start a new run (--overwrite true or another --out_dir)")
