"""``--fabric.strategy fsdp``: FSDP2 (``fully_shard``) through Lightning Fabric's ``ModelParallelStrategy``, its
sharded checkpoints, and the consolidation of the trained tensors into the single-device ``final/`` format.

Why ModelParallelStrategy and not Fabric's ``FSDPStrategy``: FSDPStrategy is FSDP1, which refuses CPUs ("FSDP is
only available on GPU") and, in Fabric, its own bitsandbytes plugin; FSDP2 shards per parameter (DTensor), so a
block holding both frozen base weights and trained adapter tensors is one unit without ``use_orig_params``
tricks, and it runs with gloo on CPU, which is where this project's tests run. Each transformer block is its own
shard unit (gathered just before its forward, freed after), then the root takes the rest (embedding, final norm,
head, a method's root modules such as virtual tokens). On GPUs the gradients are reduced in float32 whatever the
weights' dtype (bf16 parameters under ``bf16-true``, float32 reductions).

Checkpoints: ``last.ckpt`` becomes a folder written with ``torch.distributed.checkpoint`` (one shard file per
process plus ``.metadata``, and ``meta.pt`` with the schedule, the :class:`TrainState` fields and what the run
trained), holding only the trained tensors and their optimizer state under their plain names, so it loads at any
world size, including 1 (no process group). It is written to ``last.ckpt.tmp/`` and renamed into place by rank 0
after every rank finished, so an interrupted save never leaves a half checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from lit_adapter.errors import UserError, checkpoint_write_failure, is_out_of_memory
from lit_adapter.tuners import registry as methods

META_FILE = "meta.pt"
SHARD_METADATA = ".metadata"


# ------------------------------------------------------------------------------------------------- the strategy


def fsdp_strategy(world_size: int, reduce_in_float32: bool):
    """Fabric's ``ModelParallelStrategy`` with every process a data-parallel rank (no tensor parallelism) and
    :func:`shard_blocks` as its ``parallelize_fn``."""
    from lightning.fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(parallelize_fn=lambda model, mesh: shard_blocks(model, mesh, reduce_in_float32),
                                 data_parallel_size=world_size, tensor_parallel_size=1)


def shard_blocks(model: nn.Module, mesh, reduce_in_float32: bool = False) -> nn.Module:
    """``fully_shard`` each transformer block as its own unit, then the root (the rest of the model)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32) if reduce_in_float32 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (Fabric's wrapper or not) was sharded by :func:`shard_blocks`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(methods.unwrap(model), FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not a DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer, so they all take the same branch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value)
    return bool(value.item())


# ------------------------------------------------------------------------------------------------- final/ and best/


def consolidated_model(model: nn.Module, spec, config) -> Optional[nn.Module]:
    """On rank 0, a plain model holding the full trained tensors of the sharded ``model`` (gathered from every
    rank, which must all call this) and nothing else allocated, for ``methods.save_adapter_folder``: ``final/`` and
    ``best/`` are then the same files, tensor for tensor, as a single device writes. Other ranks get None."""
    import torch.distributed as dist

    inner = methods.unwrap(model)
    whole = spec.definition.final_is_checkpoint
    trained = _trained_names(inner)
    tensors: Dict[str, torch.Tensor] = {}
    for name, tensor in inner.state_dict().items():
        if whole or name in trained:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            tensors[name] = full.detach().cpu()
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = methods.build_model(spec, config)
    plain.load_state_dict(tensors, strict=False, assign=True)
    if whole and config.tie_embeddings:
        plain.lm_head.weight = plain.transformer.wte.weight
    for name, param in plain.named_parameters():
        param.requires_grad_(name in trained)
    return plain


def _trained_names(model: nn.Module) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- last.ckpt


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _model_and_optimizer_state(model: nn.Module, optimizer, keep: Callable[[str, Any], bool]) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    inner = methods.unwrap(model)
    tensors = {n: t for n, t in get_model_state_dict(inner).items() if keep(n, t)}
    optim = get_optimizer_state_dict(inner, getattr(optimizer, "optimizer", optimizer))
    return {"model": tensors, "optimizer": optim}


def save_sharded(fabric, state: Dict[str, Any], path: Path, spec, keep_previous: Optional[Path] = None) -> None:
    """Writes ``state`` (``trainer.checkpoint_state``) as a distributed checkpoint folder at ``path``, atomically
    (``path.tmp/`` renamed by rank 0 once every rank wrote its shard)."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(path.name + ".tmp")
    if fabric.global_rank == 0 and tmp.exists():
        _remove(tmp)
    fabric.barrier()
    tensors = _model_and_optimizer_state(state["model"], state["optimizer"], methods.trainable_filter(spec))
    # each rank's own RNG state (the ranks' dropout streams need not agree), in its own shard
    tensors["rng"] = {f"rank{fabric.global_rank}": torch.get_rng_state()}
    rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    rest["method"] = spec.to_dict()
    rest["world_size"] = fabric.world_size
    try:
        with _without_process_group_notice() as single:
            dcp.save(tensors, checkpoint_id=str(tmp), no_dist=single)
        if fabric.global_rank == 0:
            torch.save(rest, tmp / META_FILE)
    except (OSError, RuntimeError) as err:
        raise checkpoint_write_failure(path, err) from None
    fabric.barrier()
    if fabric.global_rank == 0:
        if keep_previous is not None and path.exists():
            _remove(keep_previous)
            os.replace(path, keep_previous)
        elif path.exists():
            _remove(path)
        os.replace(tmp, path)
    fabric.barrier()


def load_sharded(fabric, state: Dict[str, Any], path: Path, model, spec, scheduler=None) -> Dict[str, Any]:
    """Loads the distributed checkpoint folder ``path`` into ``state`` (the model's trained tensors and the optimizer
    in place, resharded to this run's world size; the other entries replaced) and returns it. Another method or
    setting, a missing ``meta.pt`` or ``.metadata``, or a missing or corrupt shard is one line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for name in (META_FILE, SHARD_METADATA):
        if not (path / name).is_file():
            raise UserError(f"--resume: {path} is not a complete sharded checkpoint ({name} is missing)")
    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"--resume: cannot read {path / META_FILE} ({type(err).__name__}); "
                        "it is not a complete checkpoint") from None
    saved_method, this_method = _flat(meta.get("method") or {}), _flat(spec.to_dict())
    if saved_method != this_method:
        differ = sorted(k for k in set(saved_method or {}) | set(this_method)
                        if (saved_method or {}).get(k) != this_method.get(k))
        raise UserError(f"--resume: {path} was written by another method or setting ({', '.join(differ)} differ: "
                        f"{_short(saved_method, differ)} there, {_short(this_method, differ)} here); resume with the "
                        "same method options, or start afresh with --overwrite true")
    expected = _model_and_optimizer_state(state["model"], state["optimizer"], methods.trainable_filter(spec))
    reader = dcp.FileSystemReader(str(path))
    try:
        stored = set(reader.read_metadata().state_dict_metadata)
    except Exception as err:
        raise UserError(f"--resume: cannot read {path / SHARD_METADATA} ({type(err).__name__})") from None
    wanted = {f"model.{n}" for n in expected["model"]}
    stored_model = {k for k in stored if k.startswith("model.")}
    if wanted != stored_model:
        missing, extra = sorted(wanted - stored_model), sorted(stored_model - wanted)
        raise UserError(f"--resume: {path} does not fit this run's {spec.describe()}: "
                        f"{len(missing)} missing, {len(extra)} unexpected tensors (e.g. {(missing or extra)[0]})")
    # this rank's RNG state where the saving run had this rank, else rank 0's
    rng_key = f"rank{fabric.global_rank}" if f"rng.rank{fabric.global_rank}" in stored else "rank0"
    expected["rng"] = {rng_key: torch.get_rng_state()}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _without_process_group_notice() as single:
            dcp.load(expected, checkpoint_id=str(path), no_dist=single)
    except (Exception, CheckpointException) as err:  # a missing or truncated shard (a BaseException in torch)
        failures = list(getattr(err, "failures", {}).values())
        cause = failures[0] if failures else err
        cause = cause[0] if isinstance(cause, tuple) else cause  # torch wraps each rank's as (exception, traceback)
        if isinstance(cause, BaseException) and is_out_of_memory(cause):
            raise cause from None
        reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:160]}".rstrip(": ")
        raise UserError(f"--resume: a shard of {path} is missing or corrupt ({reason}); resume from a complete "
                        "checkpoint or start afresh with --overwrite true") from None
    inner = methods.unwrap(state["model"])
    set_model_state_dict(inner, expected["model"], options=_partial())
    set_optimizer_state_dict(inner, getattr(state["optimizer"], "optimizer", state["optimizer"]),
                             expected["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(expected["rng"][rng_key])
    for key, value in meta.items():
        if key in state and key not in ("model", "optimizer"):
            state[key] = value
    return state


@contextlib.contextmanager
def _without_process_group_notice():
    """Yields whether this process runs without a process group (world size 1: a sharded checkpoint resumed, and
    then saved, in one process), for DCP's ``no_dist``. torch 2.13 warns on every such save and load, even when
    told so with ``no_dist=True``; here one process is the intent, so the notice is dropped."""
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield not (dist.is_available() and dist.is_initialized())


def _flat(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"settings": {"r": 8}}`` -> ``{"settings.r": 8}``: the differing settings are then named one by one."""
    out: Dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _partial():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)


def _short(values: Optional[Dict[str, Any]], keys) -> str:
    return ", ".join(f"{k}={(values or {}).get(k)!r}" for k in keys)
