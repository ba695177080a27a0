"""Builds the ``finetune/*.py`` command lines from one signature, so the scripts stay thin and consistent.

jsonargparse turns the typed parameters below into options (dataclasses become groups such as
``--train.learning_rate``) and the docstrings into ``--help``; every script also accepts ``--config FILE.yaml``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Tuple

from lit_adapter.errors import run_cli

QuantizeMode = Optional[Literal["bnb.int8", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4"]]

_COMMON_DOC = """
    Args:
        checkpoint_dir: Folder with the base model (model_config.json, lit_model.safetensors or lit_model.pth,
            tokenizer.model), as written by scripts/convert_*_checkpoint.py.
        model_name: A known configuration (e.g. 7B, Llama-2-7b, stories260K) for --dry_run without weights.
        model: Changes to the base model for this run: --model.rope_scaling extends its context window.
        out_dir: Where checkpoints, logs, summary.json and the final adapter go.
        data: The prepared instruction data.
        attention: Dense or sparse causal attention for the base model's layers.
        quantize: Load the frozen base in 8 or 4 bits with bitsandbytes: bnb.int8 (LLM.int8()), bnb.nf4 (QLoRA), bnb.nf4-dq
            (NF4 with double quantization) or bnb.fp4; the trainable tensors stay unquantized.
        train: Optimisation settings.
        eval: Validation settings.
        fabric: Accelerator, devices, strategy and precision.
        logger: Experiment logging.
        resume: Continue the run in out_dir from its last.ckpt (model, optimizer, scheduler, step, data order, RNG),
            with the settings it was started with: a changed one (e.g. --lora.alpha, --attention.pattern,
            --quantize) is refused by name; --train.max_steps, logging, validation and hardware may change.
        dry_run: Build the model on the meta device, print the trainable and total parameter counts and exit.
        overwrite: Replace the run already in out_dir (its last.ckpt, final/ and summary.json); without it, or
            --resume, a second run into a used out_dir is refused.
"""


@dataclass
class EntryPoint:
    """Another command on the same loop and the same method options (``finetune/classify.py``, ``finetune/dpo.py``)."""

    run: Callable[..., Any]
    """Called as ``run(spec, fabric_args=..., **options)`` in place of :func:`lit_adapter.train.run.finetune`."""
    data: Any
    """The ``--data.*`` group's default (a dataclass instance; its type is the group)."""
    data_help: str
    summary: str
    """The first paragraph of ``--help``, before the method's own summary."""
    extra: Sequence[Tuple[str, Any, str]] = ()
    """More option groups, ``(name, default dataclass instance, help line)``, after the method's settings."""
    out_prefix: str = "out"
    """``--out_dir`` defaults to ``<out_prefix>/<method>``."""


def make_finetune_command(method: str, entry: Optional[EntryPoint] = None) -> Callable[..., Any]:
    """The ``setup`` function of ``finetune/<method>.py``: its options, defaults and ``--help`` come from the
    method's registry entry (its settings dataclass becomes the ``--<settings_group>.*`` group). ``entry`` makes
    the same options drive another entry point (:class:`EntryPoint`)."""
    from lit_adapter.model.attention import AttentionConfig
    from lit_adapter.model.config import ModelArgs
    from lit_adapter.tuners.registry import MethodSpec, get_method
    from lit_adapter.train.run import DataArgs, EvalArgs, FabricArgs, LoggerArgs, TrainArgs, finetune

    definition = get_method(method)
    settings_name, settings_cls = definition.settings_group, definition.settings_cls
    run = entry.run if entry is not None else finetune
    data = entry.data if entry is not None else DataArgs()
    extra = entry.extra if entry is not None else ()
    out_prefix = entry.out_prefix if entry is not None else "out"

    def setup(**kwargs: Any):
        settings = kwargs.pop(settings_name) if settings_name else None
        spec = MethodSpec(method=method, settings=settings, attention=kwargs.pop("attention"),
                          quantize=kwargs.pop("quantize"))
        return run(spec, fabric_args=kwargs.pop("fabric"), **kwargs)

    P = inspect.Parameter
    params = [
        P("checkpoint_dir", P.KEYWORD_ONLY, default=None, annotation=Optional[Path]),
        P("model_name", P.KEYWORD_ONLY, default=None, annotation=Optional[str]),
        P("model", P.KEYWORD_ONLY, default=ModelArgs(), annotation=ModelArgs),
        P("out_dir", P.KEYWORD_ONLY, default=Path(f"{out_prefix}/{method}"), annotation=Path),
        P("data", P.KEYWORD_ONLY, default=data, annotation=type(data)),
    ]
    if settings_name:
        params.append(P(settings_name, P.KEYWORD_ONLY, default=settings_cls(), annotation=settings_cls))
    params += [P(name, P.KEYWORD_ONLY, default=default, annotation=type(default)) for name, default, _ in extra]
    params += [
        P("attention", P.KEYWORD_ONLY, default=AttentionConfig(), annotation=AttentionConfig),
        P("quantize", P.KEYWORD_ONLY, default=None, annotation=QuantizeMode),
        P("train", P.KEYWORD_ONLY, default=replace(TrainArgs(), **definition.train_defaults), annotation=TrainArgs),
        P("eval", P.KEYWORD_ONLY, default=EvalArgs(), annotation=EvalArgs),
        P("fabric", P.KEYWORD_ONLY, default=FabricArgs(), annotation=FabricArgs),
        P("logger", P.KEYWORD_ONLY, default=LoggerArgs(), annotation=LoggerArgs),
        P("resume", P.KEYWORD_ONLY, default=False, annotation=bool),
        P("dry_run", P.KEYWORD_ONLY, default=False, annotation=bool),
        P("overwrite", P.KEYWORD_ONLY, default=False, annotation=bool),
    ]
    setup.__signature__ = inspect.Signature(params)
    setup.__annotations__ = {p.name: p.annotation for p in params}
    doc = _COMMON_DOC
    if settings_name:
        doc = doc.replace("        attention:", f"        {settings_name}: The method's hyper-parameters.\n        attention:")
    for name, _, help_line in extra:
        doc = doc.replace("        attention:", f"        {name}: {help_line}\n        attention:")
    summary = definition.summary.strip()
    if entry is not None:
        doc = doc.replace("        data: The prepared instruction data.", f"        data: {entry.data_help}")
        summary = entry.summary.strip() + "\n\n" + summary
    setup.__doc__ = summary + "\n" + doc
    setup.__name__ = f"finetune_{method}"
    return setup


def cli(function: Callable[..., Any]) -> Any:
    """Parses the command line for ``function`` and runs it, reporting user mistakes as one line."""
    from jsonargparse import CLI

    return run_cli(CLI, function, as_positional=False)
