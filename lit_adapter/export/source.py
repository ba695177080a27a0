"""What an export reads, and what its model is made of.

A :class:`Source` is a base checkpoint folder, or a run's ``final/`` together with its base: the model's
*structure* built on the meta device, holding the trained tensors of ``final/adapter.safetensors`` (nothing else
allocated) and, loaded only when needed, the base weights. Both exports (:mod:`lit_adapter.export.merge`,
:mod:`lit_adapter.export.peft_format`) work from the structure and the method's protocol rather than from a
method's name: which modules the method put into the model decides what can be written, so a method added
later, whose modules answer nothing, is refused instead of being exported without its new parts.

:func:`inspect_structure` sorts the modules: those of the plain LLaMA, the wrappers of a base linear (each folds:
``tuners.wrapping.LinearWrapper``), the other modules a method adds that answer for themselves
(``tuners.base.FoldAnswer``: LLaMA-Adapter's prompts, bottleneck adapters, sparse attention kernels), and
anything else, which is named in the refusal (forward hooks, unknown modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import lit_adapter.model.gpt as base
from lit_adapter.checkpoint import base_key, check_keys, find_weights, load_state_dict
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.tuners.registry import ADAPTER_FILE, MethodSpec, build_model, is_added, read_spec
from lit_adapter.data.tokenizer import TOKENIZER_FILE, Tokenizer, has_tokenizer
from lit_adapter.tuners.base import FoldAnswer
from lit_adapter.tuners.wrapping import LinearWrapper

StateDict = Dict[str, torch.Tensor]

_PLAIN = {nn.ModuleDict, nn.ModuleList, nn.Embedding, nn.Linear, nn.Dropout, nn.Identity, base.RMSNorm,
          nn.LayerNorm, base.LLaMAMLP, base.GptNeoxMLP, base.Block, base.CausalSelfAttention}
"""Modules of LLaMA itself (exact types: a subclass may compute something else). Dropout and Identity are LoRA's
dropout on its branch's input, which does nothing at inference."""
_COMPARED = ("vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_query_groups", "n_embd",
             "intermediate_size", "rope_base", "norm_eps", "tie_embeddings", "norm_class", "mlp_class", "bias",
             "lm_head_bias", "position_embedding", "gelu_approximate")


@dataclass
class Structure:
    """The modules of a model by kind (qualified names)."""

    wrappers: Dict[str, LinearWrapper] = field(default_factory=dict)
    """The outermost wrapper of each wrapped base linear."""
    answering: Dict[str, FoldAnswer] = field(default_factory=dict)
    """The other modules a method added, which say themselves whether plain LLaMA can hold them."""
    unknown: List[Tuple[str, str]] = field(default_factory=list)
    """``(name, reason)`` of every part with no counterpart in LlamaForCausalLM."""


def inspect_structure(model: nn.Module) -> Structure:
    out = Structure()
    if not isinstance(model, base.GPT) or type(model).forward is not base.GPT.forward:
        out.unknown.append(("", f"its model class {type(model).__name__} is not LLaMA's"))
    inside_wrapper: List[str] = []
    hooks: List[Tuple[str, str]] = []  # reported after the modules, whose reasons say more
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            hooks.append((name, f"a forward hook on {name or 'the model'} changes its output"))
        if name == "" or any(name.startswith(w + ".") for w in inside_wrapper):
            continue  # the model itself (checked above); the base linear inside a wrapper (the wrapper decides)
        if isinstance(module, LinearWrapper):
            out.wrappers[name] = module
            inside_wrapper.append(name)
        elif isinstance(module, FoldAnswer):
            out.answering[name] = module
        elif type(module) not in _PLAIN:
            out.unknown.append((name, f"its {type(module).__name__} module ({name}) has no counterpart in "
                                      "LlamaForCausalLM"))
    out.unknown += hooks
    return out


@dataclass
class Source:
    """A base checkpoint folder, or a run's ``final/`` and its base, ready to export."""

    config: Config
    model: nn.Module
    """The structure, on the meta device."""
    spec: Optional[MethodSpec]
    """The run's method, settings, attention and quantization; None for a base checkpoint folder."""
    base_dir: Optional[Path]
    """The folder of the base weights and tokenizer (a full fine-tune's ``final/`` itself)."""
    adapter_dir: Optional[Path] = None
    trained: StateDict = field(default_factory=dict)
    """The tensors of ``final/adapter.safetensors``, under the model's parameter names."""
    _base: Optional[StateDict] = None

    @property
    def label(self) -> str:
        """How refusals name what is exported: the method, or "the base checkpoint"."""
        return self.spec.method if self.spec is not None else "the base checkpoint"

    def base_weights(self) -> StateDict:
        """The base checkpoint's tensors (our names, as stored), read once and checked key for key and shape for
        shape against the model's base tensors (those the method does not add)."""
        if self._base is None:
            if self.base_dir is None:
                raise UserError("this export needs the base weights: pass --checkpoint_dir")
            base = load_state_dict(find_weights(self.base_dir))
            added = is_added(self.spec) if self.spec is not None else (lambda name: False)
            expected = {base_key(k): t for k, t in self.model.state_dict(keep_vars=True).items() if not added(k)}
            tied = self.config.tie_embeddings  # a tied checkpoint may store the head once, as the embedding
            check_keys(expected, base, f"the checkpoint {self.base_dir} does not fit this model",
                       "Is it the base this run was trained on?", allow_missing=lambda k: tied and k == "lm_head.weight")
            self._base = base
        return self._base

    def tokenizer(self) -> Tuple[Tokenizer, Optional[bytes]]:
        """Our tokenizer of the base and the bytes of its SentencePiece ``tokenizer.model`` (None for a BPE
        tokenizer, whose files are copied as they are)."""
        if self.base_dir is None or not has_tokenizer(self.base_dir):
            raise UserError(f"{self.base_dir} has no {TOKENIZER_FILE}, tokenizer.json or vocab.json + merges.txt "
                            "(the tokenizer of the checkpoint)")
        tokenizer = Tokenizer(self.base_dir)
        return tokenizer, tokenizer.processor.serialized_model_proto() if tokenizer.processor is not None else None


def load_source(checkpoint_dir: Optional[Path], adapter_dir: Optional[Path], need_base: bool = True) -> Source:
    """The :class:`Source` of a base folder (``adapter_dir`` None) or of a run's ``final/`` on its base.

    The base defaults to the one recorded in ``final/adapter_config.json``; a base whose shape differs from the
    recorded one is refused. Without ``need_base`` (a PEFT export needs no base weights) the recorded shape is
    enough when the base folder is not given.
    """
    if adapter_dir is None:
        if checkpoint_dir is None:
            raise UserError("pass --checkpoint_dir (a converted checkpoint folder) and, for a fine-tuned model, "
                            "--adapter_dir (its run's final/ folder)")
        config = Config.from_checkpoint_dir(checkpoint_dir)
        with torch.device("meta"):
            model = base.GPT(config)
        return Source(config, model, None, Path(checkpoint_dir))
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"fine-tuned folder not found: {adapter_dir} (a run writes out_dir/final/)")
    spec, meta = read_spec(adapter_dir)
    if spec.definition.final_is_checkpoint:
        # a full fine-tune's final/ is a whole checkpoint folder: it is its own base
        config = Config.from_checkpoint_dir(adapter_dir)
        base_dir: Optional[Path] = adapter_dir
        trained: StateDict = {}
    else:
        recorded = meta.get("base_checkpoint_dir")
        base_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (Path(recorded) if recorded else None)
        config = _base_config(base_dir, meta, adapter_dir, given=checkpoint_dir is not None, need_base=need_base)
        path = adapter_dir / ADAPTER_FILE
        if not path.is_file():
            raise UserError(f"adapter weights not found: {path}; the run's final/ folder is incomplete")
        trained = load_state_dict(path)
    spec.validate(config)
    with torch.device("meta"):
        model = build_model(spec, config)
    _check_trained(model, trained, spec, adapter_dir / ADAPTER_FILE)
    return Source(config, model, spec, base_dir if base_dir is not None and base_dir.is_dir() else None,
                  adapter_dir, trained)


def _base_config(base_dir: Optional[Path], meta: Dict[str, Any], adapter_dir: Path, given: bool,
                 need_base: bool) -> Config:
    recorded = meta.get("base_config")
    if base_dir is None or not base_dir.is_dir():
        if given or need_base or not isinstance(recorded, dict):
            if base_dir is None:
                raise UserError(f"{adapter_dir}/adapter_config.json records no base checkpoint; pass --checkpoint_dir")
            if given:
                raise UserError(f"checkpoint directory not found: {base_dir}")
            raise UserError(f"the base checkpoint {base_dir} recorded in {adapter_dir}/adapter_config.json is not "
                            "there; pass --checkpoint_dir (the converted checkpoint the run was trained on)")
        try:
            return Config(**recorded)
        except TypeError as err:
            raise UserError(f"{adapter_dir}/adapter_config.json: its base_config does not fit ({err})") from None
    config = Config.from_checkpoint_dir(base_dir)
    if isinstance(recorded, dict):
        diff = [f"{k}={getattr(config, k)} vs {recorded[k]}" for k in _COMPARED
                if k in recorded and getattr(config, k) != recorded[k]]
        if diff:
            raise UserError(f"{adapter_dir} was trained on another base than {base_dir}: {', '.join(diff[:4])} "
                            "(this base vs the training's)")
    return config


def _check_trained(model: nn.Module, trained: StateDict, spec: MethodSpec, source: Path) -> None:
    """The trained tensors must be exactly the method's trainable parameters, shape for shape; they are then put
    into the meta model, where the method's modules read them (its folds, its PEFT mapping)."""
    keep = spec.definition.trainable
    if spec.definition.final_is_checkpoint:
        return  # the whole checkpoint is checked when its weights are read
    params = {n: p for n, p in model.named_parameters() if keep(n, p)}
    check_keys(params, trained, f"the {spec.method} weights in {source} do not fit this base model")
    model.load_state_dict(trained, strict=False, assign=True)
