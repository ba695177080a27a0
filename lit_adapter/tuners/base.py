"""What a fine-tuning method declares, and the defaults most methods share.

The rest of the package sees a method only through :class:`Method` (looked up by name in
:data:`lit_adapter.tuners.registry.REGISTRY`): the training loop, the ``final/`` writer and loader, the memory estimator,
the comparison grid and the ``finetune/<method>.py`` commands never branch on a method's name. A method module
(``lit_adapter/tuners/<method>.py``) opens with its paper and defines one subclass, instantiated once as
``METHOD``:

* its hyper-parameters, a dataclass (``settings_cls``) that becomes the ``--<settings_group>.*`` options;
* how it attaches to a plain ``GPT`` (:meth:`Method.attach`), in one of two ways: wrapping a linear by
  composition (:class:`~lit_adapter.tuners.wrapping.LinearWrapper`: LoRA, IA³, BitFit, Adapter v2's scales), or a
  module set into one of the hook slots the model declares (:mod:`lit_adapter.model.gpt`: ``CausalSelfAttention.adapter``
  for LLaMA-Adapter's prompts and prefix tuning's keys, ``Block.attn_adapter`` / ``mlp_adapter`` /
  ``out_adapter`` for bottleneck adapters, ``GPT.virtual_tokens`` for the prompt methods); never a subclass of the
  model, a copied ``forward`` or a patched global. Every module a method adds is a :class:`TunerLayer`;
* what trains (:meth:`Method.trainable`, from :meth:`Method.trained_names_for` its settings), which is also what
  the resumable checkpoint keeps, and which of those tensors the method adds to the base (:meth:`Method.is_added`:
  they are initialised, not loaded);
* what ``final/`` stores: the trained tensors only, or (``final_is_checkpoint``) a whole checkpoint folder;
* its optimizer parameter groups (:meth:`Method.param_groups`; by default one group of every trainable tensor);
* its terms for the memory estimator (:meth:`Method.memory_terms`, a
  :class:`~lit_adapter.memory.terms.MemoryTerms` that the estimator's walk asks at every linear, attention and
  sublayer output);
* what inference needs after loading (:meth:`Method.prepare_for_inference`, e.g. folding LoRA into the weights);
* optionally, initial values taken from the base checkpoint (:meth:`Method.initialize_from_base`) and a folded
  form of the trained tensors for ``final/`` (:meth:`Method.final_tensors`).
* how its contribution is switched off, leaving the base model's function (:meth:`Method.switched_off`: DPO's
  reference policy without a second copy of the weights). By default every :class:`TunerLayer` is told to pass
  through (``peft_enabled = False``); a method's own modules check that flag.
* how it folds into plain LLaMA weights: each wrapper of a base linear declares its fold
  (``tuners.wrapping.LinearWrapper.fold_weights``), each other module it adds answers :class:`FoldAnswer`;
* its PEFT mapping (:meth:`Method.peft_adapter`): the ``adapter_config.json`` entries and PEFT's tensors, or
  (:class:`Refused`) the one-line reason there is none.

``lit_adapter.export`` asks these and names no method and no module class of one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Set, Tuple, \
    runtime_checkable

import torch
import torch.nn as nn

from lit_adapter.model.config import Config
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model.gpt import GPT


EMBEDDING_NAMES = ("wte",)
"""The token embedding (``transformer.wte``); with a tied head (llama2.c's models) the head's weight is the same."""
NORM_NAMES = ("norm_1", "norm_2", "ln_f")
"""Every RMSNorm weight: the two of each block and the final one."""


class TunerLayer(nn.Module):
    """Every module a method adds to the base model (PEFT's ``BaseTunerLayer``, torchtune's ``AdapterModule``).

    The protocol is what the rest of the package asks of such a module, so that nothing outside ``tuners/`` looks
    a method's modules up by name:

    * ``peft_enabled``: False makes the module compute what the base alone would (:func:`switched_off`);
    * :meth:`reset_peft_parameters` (no arguments): the method's initial values of the module's own tensors, called
      once they leave the meta device (:func:`lit_adapter.tuners.registry.prepare_model`) and by the method's tests;
    * :meth:`base_layer`: the frozen base layer a wrapper holds, whose tensors are loaded, not initialised, and
      :meth:`materialize`, which allocates the module's own tensors that a model built on the meta device left
      there, beside that base layer's weight.
    """

    peft_enabled: bool = True
    """A class attribute; set on an instance (``False``) the module passes the base's computation through."""

    def base_layer(self) -> Optional[nn.Module]:
        """The frozen base layer this module wraps (a linear), or None for a module that wraps nothing."""
        return None

    def own_tensors(self) -> Iterator[Tuple[nn.Module, str, torch.Tensor]]:
        """``(owner, name, tensor)`` of the parameters and buffers the method added here (not the base layer's)."""
        base = self.base_layer()
        skip = set() if base is None else {id(m) for m in base.modules()}
        for module in self.modules():
            if id(module) in skip:
                continue
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                yield module, name, tensor

    @torch.no_grad()
    def materialize(self, device: Optional[torch.device] = None) -> None:
        """Allocates (uninitialised) the own tensors still on the meta device: beside the base layer's weight, in
        its dtype when it is a float (a quantized base: the tensor's own); without a loaded base layer, on
        ``device``, and where that is None too they stay on meta."""
        base = self.base_layer()
        weight = getattr(base, "weight", None) if base is not None else None
        if weight is not None and not weight.is_meta:
            device = weight.device
        if device is None:
            return
        for owner, name, tensor in list(self.own_tensors()):
            if not tensor.is_meta:
                continue
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else tensor.dtype
            new = torch.empty(tensor.shape, device=device, dtype=dtype)
            if isinstance(tensor, nn.Parameter):
                setattr(owner, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                owner.register_buffer(name, new, persistent=name not in owner._non_persistent_buffers_set)

    def reset_peft_parameters(self) -> None:
        """Gives the module's own tensors the method's initial values, first allocating those still on meta with
        :meth:`materialize` (beside the base layer's weight; a module without a base layer is materialized by
        :func:`initialize_tuner_layers`, which knows the device)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its tensors start")


def tuner_layers(model: nn.Module, kind: type = TunerLayer) -> Dict[str, TunerLayer]:
    """The method modules of type ``kind`` in ``model`` by qualified name (``"transformer.h.0.attn_adapter"``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


@torch.no_grad()
def initialize_tuner_layers(model: nn.Module, device: Optional[torch.device] = None, only_meta: bool = False) -> None:
    """Allocates (beside each wrapped base layer, else on ``device``) and initialises every :class:`TunerLayer` of
    ``model``; ``only_meta``: only those with tensors still on the meta device, whose values no checkpoint gave."""
    for module in model.modules():
        if isinstance(module, TunerLayer):
            if only_meta and not any(t.is_meta for _, _, t in module.own_tensors()):
                continue
            module.materialize(device)
            module.reset_peft_parameters()


@contextlib.contextmanager
def switched_off(model: nn.Module) -> Iterator[List[TunerLayer]]:
    """Inside, every :class:`TunerLayer` of ``model`` computes what the base layer alone would; the modules switched
    off are yielded. Their tensors are untouched, so leaving the block restores the method."""
    modules = [m for m in model.modules() if isinstance(m, TunerLayer) and m.peft_enabled]
    for module in modules:
        module.peft_enabled = False
    try:
        yield modules
    finally:
        for module in modules:
            module.peft_enabled = True


def has_name_part(name: str, parts: Tuple[str, ...]) -> bool:
    """Whether one of the dotted components of the tensor name ``name`` is in ``parts``."""
    return any(part in parts for part in name.split("."))


class Refused(Exception):
    """Why a trained model has no exact form in what was asked (a PEFT adapter): one line, which the caller
    completes with what was asked (``"PEFT cannot represent lora: <why>"``)."""


@runtime_checkable
class FoldAnswer(Protocol):
    """What a module a method adds beside the base layers (not a wrapper of a base linear: those fold, see
    ``tuners.wrapping.LinearWrapper``) answers an export into plain LLaMA weights (``lit_adapter.export.merge``).

    Any module with these two members answers; a module that answers nothing and is not LLaMA's own is refused
    by the export as unknown.
    """

    fold_label: str
    """What the module is, plural, as a refusal names it: ``"adaption prompts"`` (``"its adaption prompts
    (layers 2-4) have non-zero gates"``)."""

    def fold_refusal(self) -> Optional[str]:
        """None: at its current values the module adds nothing, and the export leaves it (and the tensors the
        method added in it) out; else why LLaMA cannot hold it, a phrase completing ``"its <fold_label> (layers
        ...) "``."""


@dataclass(frozen=True)
class PeftTarget:
    """One module of the HF model that a PEFT adapter adapts, and which of our layers it holds."""

    key: str
    """PEFT's key prefix of the module: ``base_model.model.model.layers.0.self_attn.q_proj``."""
    name: str
    """Its ``target_modules`` entry: ``q_proj``; on GPT-2 ``attn.c_attn``."""
    members: Tuple[str, ...]
    """Our layers it holds (``transformer.h.0.attn.q_proj``), in model order."""
    slots: Tuple[int, ...]
    """For each member, which of the module's ``n_slots`` equal blocks of output rows it is."""
    n_slots: int = 1
    """How many layers of ours the module fuses: 3 for GPT-2's ``c_attn`` (q, k, v), else 1."""


class PeftLayout(Protocol):
    """The HF model family's side of a PEFT export (``lit_adapter.export.peft_format`` gives it): how our module
    names become PEFT's, and which of our layers one HF module fuses."""

    family: str
    """``"llama"`` (``LlamaForCausalLM``) or ``"gpt2"`` (``GPT2LMHeadModel``)."""
    fan_in_fan_out: bool
    """The HF linears store their weight (in, out) (GPT-2's ``Conv1D``): the config's ``fan_in_fan_out``."""

    def key(self, name: str) -> str:
        """PEFT's key prefix of our module ``name`` (``base_model.model.`` + the HF module's name)."""

    def targets(self, names: Iterable[str]) -> List[PeftTarget]:
        """The HF modules holding our layers ``names``, in model order."""

    def base_weight(self, name: str) -> torch.Tensor:
        """The base checkpoint's weight (float32, (out, in)) of our linear ``name`` (``transformer.h.0.attn.q_proj``),
        for a method whose adapter depends on the base (PiSSA's and OLoRA's initial factors)."""


@dataclass
class PeftAdapter:
    """A method's PEFT adapter: what :meth:`Method.peft_adapter` returns."""

    config: Dict[str, Any]
    """The ``adapter_config.json`` entries of the method (``peft_type``, ``r``, ...); the exporter adds the common
    ones (``base_model_name_or_path``, ``task_type``, ...)."""
    tensors: Dict[str, torch.Tensor]
    """Under PEFT's names."""
    carried: Set[str]
    """Our names of the trained tensors the adapter holds; a trained tensor not among them is refused (the
    adapter would be incomplete)."""


def one_value(values: Mapping[str, Any], what: str) -> Any:
    """The one value all layers share, refused when they differ (a PEFT config holds one)."""
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise Refused(f"its layers use different {what} ({distinct}); this exporter writes one")
    return distinct[0]


def json_number(value: float) -> Any:
    """``8`` rather than ``8.0`` where the value is whole (as PEFT writes ``lora_alpha``)."""
    return int(value) if float(value).is_integer() else float(value)


class Method:
    """One fine-tuning method. Subclasses set the class attributes and override what differs from the defaults."""

    name: ClassVar[str]
    """The registry key, the ``finetune/<name>.py`` script and the ``method`` recorded in ``adapter_config.json``."""
    summary: ClassVar[str]
    """The paper and one paragraph of what trains: the first lines of ``finetune/<name>.py --help``."""
    settings_cls: ClassVar[Optional[type]] = None
    """The hyper-parameter dataclass, or None for a method without any."""
    settings_group: ClassVar[Optional[str]] = None
    """The command-line group of those settings (``lora`` gives ``--lora.r``)."""
    train_defaults: ClassVar[Mapping[str, Any]] = {"learning_rate": 3e-4}
    """The finetune command's defaults for ``--train.*`` where this method differs (its learning rate, ...)."""
    trained_names: ClassVar[Tuple[str, ...]] = ()
    """Components of the names of the tensors that train with the default settings (see :meth:`trainable`)."""
    added_names: ClassVar[Tuple[str, ...]] = ()
    """Components of the names of the tensors the method adds to the base (see :meth:`is_added`)."""
    final_is_checkpoint: ClassVar[bool] = False
    """``final/`` is a complete checkpoint folder (weights, config, tokenizer) instead of the trained tensors."""
    trains_quantized_base: ClassVar[bool] = True
    """The frozen base may be quantized (``--quantize``); False for methods that train the base weights."""
    can_switch_off: ClassVar[bool] = True
    """:meth:`switched_off` gives the base model's function (DPO's reference policy without a second copy)."""
    decoder_only: ClassVar[Optional[str]] = None
    """Why the method runs on decoders only (``Config.causal``), refused in one line on an encoder; None: it runs on
    both (a method that wraps linears, fills the sublayer slots or adds virtual tokens does)."""

    def default_settings(self) -> Any:
        return self.settings_cls() if self.settings_cls is not None else None

    def validate(self, settings: Any, config: Config) -> None:
        """Raises :class:`~lit_adapter.errors.UserError` when ``settings`` cannot apply to ``config``."""

    def build(self, config: Config, settings: Any) -> GPT:
        """The base model with the method attached, on the current default device (meta: nothing allocated)."""
        model = GPT(config)
        self.attach(model, settings)
        return model

    def attach(self, model: GPT, settings: Any) -> None:
        """Adds the method to a plain ``GPT`` in place (the default :meth:`build` calls it)."""

    def trained_names_for(self, settings: Any) -> Tuple[str, ...]:
        """Components of the names of the tensors that train with ``settings`` (``None``: the defaults); a method
        whose settings unfreeze base tensors (LongLoRA's embedding and norms) adds their names."""
        return self.trained_names

    def trainable(self, name: str, param: Any = None, settings: Any = None) -> bool:
        """Whether the parameter or state-dict entry ``name`` trains under ``settings``; ``methods.trainable_filter``
        binds the settings, giving Fabric's save filter ``(name, tensor)``."""
        return has_name_part(name, self.trained_names_for(settings))

    def is_added(self, name: str) -> bool:
        """Whether ``name`` is a tensor the method adds, which a base checkpoint does not have."""
        return has_name_part(name, self.added_names)

    def packing_refusal(self, settings: Any) -> Optional[str]:
        """Why this method cannot train on packed rows (``--data.packing``), or None: it packs. The model runs a
        packed row's attention (the ``adapter`` hook and sparse kernels included) and virtual tokens once per
        example (``lit_adapter.model.packing``), so a method whose modules see one example at a time packs; one
        that mixes positions across a row outside those hooks must say why here."""

    def shard_refusal(self, settings: Any) -> Optional[str]:
        """Why this method cannot train with its tensors sharded (``--fabric.strategy fsdp``: FSDP2, each block its
        own unit), or None when it can (the default: every tensor is a parameter of a block or of the root)."""
        return None

    def reserved_positions(self, settings: Any) -> int:
        """Positions the method occupies before the first real token (the prompt methods' virtual tokens): the
        training context of real tokens is ``block_size`` minus these."""
        return 0

    def param_groups(self, model: nn.Module, settings: Any, learning_rate: float,
                     weight_decay: float) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups for ``model`` (the method attached, its trainable tensors marked with
        ``requires_grad``): a list of dicts as ``torch.optim.Optimizer`` takes them, each with ``params`` and any of
        ``lr`` and ``weight_decay`` that differ from the run's ``learning_rate`` (``--train.learning_rate``, the
        peak the schedule scales) and ``weight_decay``. The training loop, the throughput benchmark and the memory
        measurement build their optimizer from it (``trainer.method_optimizer``), so a method with its own rates
        (LoRA+: B at ``ratio x learning_rate``) needs no special case in the loop. Every trainable tensor must be
        in exactly one group. The default is one group of all of them, in ``model.parameters()`` order."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [{"params": trainable, "lr": learning_rate, "weight_decay": weight_decay}]

    def memory_terms(self, settings: Any) -> MemoryTerms:
        """What the memory estimator needs to know of this method under ``settings``: which base tensors train and
        what the method's own ops keep for backward (a subclass of :class:`MemoryTerms` in the method's module)."""
        raise NotImplementedError(f"{self.name} declares no memory terms")

    def current_name(self, name: str) -> str:
        """The name a tensor saved by an older version of this method has now (a method whose modules moved
        renames here, so ``final/`` and ``best/`` folders of earlier runs keep loading); by default ``name``."""
        return name

    def prepare_for_inference(self, model: nn.Module) -> None:
        """Called once the trained tensors are loaded, before evaluation or generation."""

    def initialize_from_base(self, model: nn.Module, settings: Any, checkpoint_dir: Path) -> None:
        """Called once the base weights are loaded and the added tensors initialised: a method may derive initial
        values from the base checkpoint (prompt tuning's text initialisation reads its tokenizer and embedding)."""

    def initialize_after_quantization(self, model: nn.Module, settings: Any) -> None:
        """Called once a quantized base (``--quantize``) is in place, before a run's trained tensors are loaded: a
        method whose initial values derive from the weights the model computes with recomputes them from the
        dequantized weights (DoRA's magnitude: QDoRA)."""

    def final_tensors(self, model: nn.Module, settings: Any) -> Tuple[Dict[str, torch.Tensor], Any]:
        """What ``final/`` stores and the settings that rebuild a model around it: by default the trainable tensors
        and the training settings; a method may fold a training-only reparameterisation away (P-tuning's encoder,
        prefix tuning's MLP) and return the settings of the folded form."""
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if self.trainable(n, p, settings)}
        return tensors, settings

    no_peft: ClassVar[Optional[str]] = None
    """Why PEFT has no adapter for this method, where it has none (the default :meth:`peft_adapter`)."""

    def peft_adapter(self, model: nn.Module, settings: Any, layout: PeftLayout) -> PeftAdapter:
        """The PEFT adapter of ``model`` (built for ``settings``, holding the trained tensors), or
        :class:`Refused` with why there is none. By default there is none: a method that trains only base tensors
        (no adapter to hold them) is told to merge, any other gives :attr:`no_peft`."""
        trained = [n for n, p in model.named_parameters() if self.trainable(n, p, settings)]
        if trained and not any(self.is_added(n) for n in trained):
            shown = ", ".join(trained[:2]) + (" ..." if len(trained) > 2 else "")
            raise Refused(f"it trains base tensors in place ({shown}), which no PEFT adapter holds; merge it into "
                          "the base with scripts/convert_to_hf.py --merge true")
        raise Refused(self.no_peft or f"this exporter knows no PEFT adapter type for {self.name}")

    def switched_off(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which ``model`` computes the base model's function: the method's modules pass through.

        Only the method's *added* modules are switched; base tensors it trains in place (Adapter v2's norms, full
        fine-tuning's weights) stay as trained, so a caller that needs the base needs its own copy of those.
        """
        return switched_off(model)

    def __repr__(self) -> str:
        return f"<method {self.name}>"
