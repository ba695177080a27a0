"""Checks every cell of a comparison grid before the first one runs, so that a misspelled option or an impossible
setting is one ``error:`` line naming the cell, not a cell marked failed an hour into the grid.

Each cell's generated config is checked against exactly what its ``finetune/<method>.py`` accepts: the command is
built by :func:`lit_adapter.cli.finetune.make_finetune_command` from the method's registry entry, so the options are its
signature (the training dataclasses and the method's ``settings_cls``). Unknown keys are named with the closest
known one; values are then parsed by the same jsonargparse parser the script uses, and the checks a run does before
it loads any weights (:func:`lit_adapter.train.run.validate_args`, :meth:`MethodSpec.validate` against the grid's
model) are run too.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError


def unknown_options(values: Dict[str, Any], known: Dict[str, Any], prefix: str = "") -> List[Tuple[str, List[str]]]:
    """The dotted keys of ``values`` that ``known`` (option name -> type) does not have, each with the known names
    at its level; a dataclass-typed option's keys are checked against its fields, recursively."""
    unknown: List[Tuple[str, List[str]]] = []
    for key, value in values.items():
        if key not in known:
            unknown.append((prefix + key, [prefix + name for name in known]))
            continue
        annotation = known[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            fields = typing.get_type_hints(annotation)  # resolves string annotations (from __future__ import)
            names = {f.name for f in dataclasses.fields(annotation)}
            unknown += unknown_options(value, {n: t for n, t in fields.items() if n in names}, f"{prefix}{key}.")
    return unknown


class CellChecker:
    """Validates cell configs; builds each method's parser once."""

    def __init__(self, config: Optional[Config], command: Optional[Callable[[str], Callable[..., Any]]] = None,
                 script: str = "finetune/{method}.py") -> None:
        self.config = config  # the grid's base model, for the method's own checks (None: skip them)
        # the cells' command (default: finetune/<method>.py; the head study's: finetune/classify.py <method>)
        self.command, self.script = command, script
        self._commands: Dict[str, Tuple[Callable[..., Any], Any]] = {}

    def _command(self, method: str):
        if method not in self._commands:
            from jsonargparse import ArgumentParser

            from lit_adapter.cli.finetune import make_finetune_command

            setup = (self.command or make_finetune_command)(method)
            parser = ArgumentParser(exit_on_error=False)
            parser.add_function_arguments(setup, as_group=False)
            self._commands[method] = (setup, parser)
        return self._commands[method]

    def check(self, method: str, cell_config: Dict[str, Any], cell: str):
        """Raises :class:`UserError` ``cell <cell>: ...`` for the first problem in ``cell_config``; returns the
        parsed options (the namespace the script's ``setup`` gets)."""
        setup, parser = self._command(method)
        known = {name: p.annotation for name, p in inspect.signature(setup).parameters.items()}
        from lit_adapter.tuners.registry import get_method

        own_group = get_method(method).settings_group
        for key, candidates in unknown_options(cell_config, known):
            group = key.split(".")[0]
            owner = _settings_owner(group) if group != own_group else None  # a typo in its own gets a spelling
            if owner:
                hint = f" (the settings of finetune/{owner}.py)"
            else:
                close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.7)
                hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"cell {cell}: unknown option {key}{hint} for {self.script.format(method=method)}")
        try:
            # jsonargparse 4.49 renamed instantiate_classes to instantiate
            instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
            parsed = instantiate(parser.parse_object(cell_config))
        except (argparse.ArgumentError, TypeError, ValueError) as err:
            raise UserError(f"cell {cell}: {' '.join(str(err).split())[:400]}") from None
        self._semantic_checks(method, parsed, cell)
        return parsed

    def _semantic_checks(self, method: str, parsed, cell: str) -> None:
        from lit_adapter.tuners.registry import MethodSpec, get_method
        from lit_adapter.train.run import context_length, validate_args

        settings_group = get_method(method).settings_group
        try:
            validate_args(parsed.train, parsed.eval, parsed.fabric)
            spec = MethodSpec(method=method, settings=getattr(parsed, settings_group) if settings_group else None,
                              attention=parsed.attention, quantize=parsed.quantize)
            if self.config is not None:
                spec.validate(self.config)
                # the cell's context against its window (RoPE scaling included), as its run would refuse it
                context_length(parsed.data, parsed.model.apply(self.config), spec)
        except UserError as err:
            raise UserError(f"cell {cell}: {err}") from None


def _settings_owner(group: str) -> Optional[str]:
    """The method whose settings group is ``group`` (e.g. ``lora``), if any."""
    from lit_adapter.tuners.registry import METHODS, get_method

    return next((name for name in METHODS if get_method(name).settings_group == group), None)


def cell_option_groups() -> List[str]:
    """The top-level options a cell's config can set, for any method (``train``, ``lora``, ``quantize``, ...)."""
    from lit_adapter.cli.finetune import make_finetune_command
    from lit_adapter.tuners.registry import METHODS

    names: List[str] = []
    for method in METHODS:
        names += [n for n in inspect.signature(make_finetune_command(method)).parameters if n not in names]
    return names


def dry_run_cell(method: str, parsed, config: Config) -> Dict[str, Any]:
    """A cell's trainable and total parameter counts (the model built on the meta device, as ``--dry_run`` does)
    and the analytic peak-memory estimate of one training step (an estimate, not a measurement)."""
    import torch

    from lit_adapter.tuners import registry as methods
    from lit_adapter.memory.estimate import estimate_memory
    from lit_adapter.memory.saved import ESTIMATED_PATTERNS
    from lit_adapter.runtime import default_precision
    from lit_adapter.train.run import context_length

    settings_group = methods.get_method(method).settings_group
    spec = methods.MethodSpec(method=method, settings=getattr(parsed, settings_group) if settings_group else None,
                              attention=parsed.attention, quantize=parsed.quantize)
    config = parsed.model.apply(config)
    with torch.device("meta"):
        model = methods.build_model(spec, config)
    methods.mark_trainable(model, spec)
    out: Dict[str, Any] = {"trainable_params": methods.count_parameters(model, requires_grad=True),
                           "total_params": methods.count_parameters(model), "estimated_peak_gb": None}
    train, fabric = parsed.train, parsed.fabric
    precision = fabric.precision or default_precision(fabric.accelerator)
    on_gpu = fabric.accelerator in ("cuda", "gpu") or (fabric.accelerator == "auto" and torch.cuda.is_available())
    out["estimate_device"] = "cuda" if on_gpu else "cpu"
    if spec.attention.pattern not in ESTIMATED_PATTERNS:
        out["estimate_note"] = f"no estimate for {spec.attention.pattern} attention"
        return out
    try:
        estimate = estimate_memory(config, spec, train.micro_batch_size, context_length(parsed.data, config, spec),
                                   {"bf16-mixed": "bf16-true", "16-mixed": "16-true"}.get(precision, precision),
                                   train.activation_checkpointing, device_type=out["estimate_device"],
                                   optimizer="adamw" if train.optimizer == "adamw" else "adamw8bit", loss=train.loss)
    except UserError as err:  # a combination the estimator does not model
        out["estimate_note"] = str(err)
        return out
    out["estimated_peak_gb"] = estimate["peak_bytes"] / 1e9
    return out
