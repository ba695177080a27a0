"""Reading and writing checkpoint directories.

A checkpoint directory (every script's ``--checkpoint_dir``) holds ``model_config.json`` (:meth:`Config.save`), the
weights as ``lit_model.safetensors`` (preferred) or ``lit_model.pth``, and the SentencePiece ``tokenizer.model``.
Weights are checked key by key and shape by shape before anything is loaded, so a checkpoint that does not fit
the config fails with one message naming the offending tensors instead of a wall of PyTorch errors
(:func:`check_keys`, which every loader in the package uses). A method that wraps a base linear by composition
holds its weight as ``...q_proj.linear.weight``; :func:`model_key` and :func:`base_key` are the one place that
translates between a base checkpoint's names and such a model's.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Container, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError, require_folder
from lit_adapter.model.gpt import GPT
from lit_adapter.data.tokenizer import Tokenizer

CONFIG_FILE = "model_config.json"
WEIGHT_FILES = ("lit_model.safetensors", "lit_model.pth")
StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, Path]
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def find_weights(checkpoint_dir: PathLike) -> Path:
    """The weights file of ``checkpoint_dir``: ``lit_model.safetensors`` if present, else ``lit_model.pth``."""
    checkpoint_dir = Path(checkpoint_dir)
    require_folder(checkpoint_dir)
    for name in WEIGHT_FILES:
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise UserError(f"no weights in {checkpoint_dir}: expected {' or '.join(WEIGHT_FILES)}")


def load_state_dict(path: PathLike) -> StateDict:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.bin`` torch file (memory-mapped, ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # torch.save's zip container can be memory-mapped; the pre-1.6 legacy format cannot
        state_dict = torch.load(path, weights_only=True, mmap=zipfile.is_zipfile(path), map_location="cpu")
    except Exception as err:  # corrupt, truncated or not a checkpoint at all
        raise UserError(f"cannot read weights file {path}: {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not hold a plain state dict (name -> tensor)")
    return state_dict


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file next to ``path`` and renames it into place, so an interrupted
    write never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state_dict: StateDict, path: PathLike) -> None:
    """Writes ``state_dict`` atomically: safetensors for ``*.safetensors``, ``torch.save`` otherwise.

    safetensors refuses tensors that share memory (tied embeddings, views); those are written as separate
    contiguous copies, so the file loads back with every key the state dict had.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = _unshare(state_dict)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    else:
        atomic_write(path, lambda tmp: torch.save(state_dict, tmp))


def _unshare(state_dict: StateDict) -> StateDict:
    seen = set()
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if key is not None and key in seen:
            tensor = tensor.clone()
        elif key is not None:
            seen.add(key)
        out[name] = tensor.contiguous()
    return out


def _describe(keys: List[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (and {len(keys) - limit} more)" if len(keys) > limit else shown


def _shape(tensor: Any) -> Any:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__


def check_keys(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, Any],
    failure: str,
    advice: str = "",
    allow_missing: Callable[[str], bool] = lambda name: False,
) -> List[str]:
    """Checks that ``given`` (tensors read from a file) has exactly the keys and shapes of ``expected`` (a model's
    tensors); returns the missing keys that ``allow_missing`` lets pass.

    Anything else raises one :class:`UserError` line, ``"<failure>: 9 missing keys: a, b, ... (and 4 more);
    1 unexpected keys: c; 2 shape mismatches: d: checkpoint (3, 32) vs model (4, 32). <advice>"``, the keys in
    ``expected``'s order (the model's: the first shown are the first layers). Every loader that compares a file
    with a model (base checkpoints, ``final/`` tensors, ``--resume``, exports) says it this way.
    """
    missing = [k for k in expected if k not in given]
    not_allowed = [k for k in missing if not allow_missing(k)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: checkpoint {_shape(given[k])} vs model {_shape(v)}"
                  for k, v in expected.items() if k in given and _shape(given[k]) != _shape(v)]
    problems = [f"{len(keys)} {label}: {_describe(keys, limit)}" for label, keys, limit in (
        ("missing keys", not_allowed, 5), ("unexpected keys", unexpected, 5), ("shape mismatches", mismatched, 3))
        if keys]
    if problems:
        raise UserError(f"{failure}: {'; '.join(problems)}" + (f". {advice}" if advice else ""))
    return missing


def model_key(key: str, model_keys: Container[str]) -> str:
    """The model's name for a base checkpoint's tensor ``key``: the key itself, or, where a method wraps the layer
    by composition (it holds the base layer as ``linear``), the key with ``linear`` inserted after the wrapper's
    name (``...q_proj.weight`` -> ``...q_proj.linear.weight``; ``...q_proj.weight.absmax`` ->
    ``...q_proj.linear.weight.absmax``). A key the model has under neither name is returned unchanged."""
    if key in model_keys:
        return key
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the innermost module first
        wrapped = ".".join(parts[:i] + ["linear"] + parts[i:])
        if wrapped in model_keys:
            return wrapped
    return key


def base_key(key: str) -> str:
    """A model tensor's name in a base checkpoint: :func:`model_key` undone (``...q_proj.linear.weight`` ->
    ``...q_proj.weight``)."""
    return ".".join(part for part in key.split(".") if part != "linear")


def to_model_keys(state_dict: Mapping[str, torch.Tensor], model_keys: Container[str]) -> StateDict:
    """``state_dict`` (a base checkpoint's) under the model's names (:func:`model_key`)."""
    return {model_key(k, model_keys): v for k, v in state_dict.items()}


def load_weights_into(
    model: nn.Module,
    state_dict: StateDict,
    allow_missing: Callable[[str], bool] = lambda name: False,
    source: str = "checkpoint",
) -> List[str]:
    """Loads ``state_dict`` into ``model`` after checking every key and shape; returns the (allowed) missing keys.

    Works for a model created under ``torch.device("meta")``: tensors are assigned rather than copied, so the
    model ends up on the checkpoint's device and dtype (parameters left missing stay where they were, e.g. on
    meta, for the caller to initialise). A tied model (``config.tie_embeddings``) may be given a checkpoint without
    ``lm_head.weight``; the head is re-tied to the embedding afterwards.
    """
    config: Optional[Config] = getattr(model, "config", None)
    tied = bool(config is not None and config.tie_embeddings)
    expected = model.state_dict()
    hint = f" ({config.name or 'this config'}: n_layer={config.n_layer}, n_embd={config.n_embd})" if config else ""
    advice = f"Is model_config.json the config these weights were saved with?{hint}"

    if tied and "lm_head.weight" in state_dict and "transformer.wte.weight" in state_dict:
        head, wte = state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]
        if head.shape != wte.shape or not torch.equal(head, wte):
            raise UserError(f"the config ties lm_head.weight to transformer.wte.weight (tie_embeddings=True) but the "
                            f"{source} has two different matrices. {advice}")
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}

    # a tied checkpoint may store the head once, as the embedding
    missing = check_keys(expected, state_dict, f"the {source} does not fit the model", advice,
                         allow_missing=lambda k: (tied and k == "lm_head.weight") or allow_missing(k))
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return [k for k in missing if not (tied and k == "lm_head.weight")]


def load_checkpoint_dir(
    checkpoint_dir: PathLike, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
) -> Tuple[Config, GPT, Tokenizer]:
    """``(config, model, tokenizer)`` of a checkpoint directory; the model is in eval mode on ``device``.

    The model is built on the meta device and takes the checkpoint's tensors directly, so no memory is spent on a
    random initialisation; ``dtype`` casts the floating-point weights (default: as stored).
    """
    checkpoint_dir = Path(checkpoint_dir)
    require_folder(checkpoint_dir)
    if not (checkpoint_dir / CONFIG_FILE).is_file():
        raise UserError(f"{checkpoint_dir} has no {CONFIG_FILE}; is it a converted lit-adapter checkpoint directory?")
    config = Config.from_checkpoint_dir(checkpoint_dir)
    tokenizer = Tokenizer.from_checkpoint_dir(checkpoint_dir)
    weights = find_weights(checkpoint_dir)
    state_dict = cast_state_dict(load_state_dict(weights), device=device, dtype=dtype)
    with torch.device("meta"):
        model = GPT(config)
    load_weights_into(model, state_dict, source=f"checkpoint {weights}")
    return config, model.eval(), tokenizer


def cast_state_dict(
    state_dict: StateDict, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None
) -> StateDict:
    """Moves tensors to ``device`` and casts the floating-point ones to ``dtype`` (integer tensors keep theirs)."""
    return {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
        for k, v in state_dict.items()
    }
