"""What a fine-tuning method declares, and the defaults most methods share.

The rest of the package sees a method only through :class:`Method` (looked up by name in
:data:`lit_adapter.methods.REGISTRY`): the training loop, the ``final/`` writer and loader, the memory estimator,
the comparison grid and the ``finetune/<method>.py`` commands never branch on a method's name. A method module
(``lit_adapter/tuners/<method>.py``) opens with its paper and defines one subclass, instantiated once as
``METHOD``:

* its hyper-parameters, a dataclass (``settings_cls``) that becomes the ``--<settings_group>.*`` options;
* how it attaches to the base (:meth:`Method.build`): by composition (wrapping layers, as LoRA does) or through
  the model's hooks (``GPT.build_block``, ``CausalSelfAttention.scaled_dot_product_attention``, as
  LLaMA-Adapter does); never a copied ``forward`` or a patched global;
* what trains (:meth:`Method.trainable`, from :meth:`Method.trained_names_for` its settings), which is also what
  the resumable checkpoint keeps, and which of those tensors the method adds to the base (:meth:`Method.is_added`:
  they are initialised, not loaded);
* what ``final/`` stores: the trained tensors only, or (``final_is_checkpoint``) a whole checkpoint folder;
* its optimizer parameter groups (:meth:`Method.param_groups`; by default one group of every trainable tensor);
* its terms for the memory estimator (:meth:`Method.memory_terms`, a :class:`TrainedParts`);
* what inference needs after loading (:meth:`Method.prepare_for_inference`, e.g. folding LoRA into the weights);
* optionally, initial values taken from the base checkpoint (:meth:`Method.initialize_from_base`) and a folded
  form of the trained tensors for ``final/`` (:meth:`Method.final_tensors`).
* how its contribution is switched off, leaving the base model's function (:meth:`Method.switched_off`: DPO's
  reference policy without a second copy of the weights). By default every module of the method that declares
  ``peft_enabled`` (:data:`SWITCH`) is told to pass through; a method's own modules check that flag.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.config import Config
from lit_adapter.model import GPT


@dataclass(frozen=True)
class TrainedParts:
    """What trains, in the vocabulary of the memory estimator's op-by-op model (``lit_adapter.memory.saved``).

    Which tensors autograd keeps depends on which inputs and weights require a gradient, so this is all the
    estimator needs to know of a method.
    """

    norms: bool = False
    """The RMSNorm weights train."""
    base_linears: bool = False
    """Every base linear's weight trains (full fine-tuning)."""
    embedding: bool = False
    """The token embedding trains."""
    v2_linears: bool = False
    """Every linear is wrapped as ``scale * (linear(x) + bias)`` with trainable scale and bias (Adapter v2)."""
    lora_targets: Tuple[str, ...] = ()
    """Attribute names of the linears with a low-rank branch (``q_proj``, ...)."""
    lora_r: int = 0
    lora_dropout: float = 0.0
    prompt_from_layer: Optional[int] = None
    """First layer with a gated adaption prompt (LLaMA-Adapter), or None."""
    prompt_length: int = 0
    ia3_outputs: Tuple[str, ...] = ()
    """Attribute names of the linears whose output a trainable vector rescales, ``linear(x) * l`` (IA³)."""
    ia3_inputs: Tuple[str, ...] = ()
    """Attribute names of the linears whose input a trainable vector rescales, ``linear(x * l)`` (IA³)."""
    bias_linears: Tuple[str, ...] = ()
    """Attribute names of the linears given a trainable output bias, ``linear(x) + b`` (BitFit)."""
    bottleneck_sites: Tuple[str, ...] = ()
    """Where a bottleneck adapter ``x + scaling * up(act(down(x)))`` acts (Houlsby, Pfeiffer): ``attn`` and ``mlp``
    on that sublayer's output before the residual add, ``block`` on the block's output."""
    bottleneck_size: Optional[int] = None
    """The adapters' hidden width; None: ``bottleneck_width(n_embd, bottleneck_reduction_factor)``."""
    bottleneck_reduction_factor: float = 16.0
    bottleneck_activation: str = ""
    """The adapters' non-linearity by name (what it saves for backward: its input or its output)."""
    bottleneck_dropout: float = 0.0
    bottleneck_leave_out: Tuple[int, ...] = ()
    """Layers without bottleneck adapters."""
    virtual_tokens: int = 0
    """Rows of trained virtual tokens in front of every sequence (prompt tuning, P-tuning): every block runs on
    ``T + virtual_tokens`` rows, all requiring a gradient from the first block on; ln_f, the head and the loss see
    the ``T`` real rows. An encoder's few (P, hidden) activations (P-tuning, prefix tuning's MLP) are not counted:
    under a megabyte for 7B."""
    prefix_length: int = 0
    """Trained keys and values in front of every layer's attention (prefix tuning): each SDPA attends over
    ``prefix_length + T`` keys under a boolean mask, and its output requires a gradient in every layer."""


def bottleneck_width(n_embd: int, reduction_factor: float, size: Optional[int] = None) -> int:
    """A bottleneck adapter's hidden width: ``size``, else AdapterHub's ``int(n_embd // reduction_factor)``, >= 1."""
    return size if size is not None else max(1, int(n_embd // reduction_factor))


EMBEDDING_NAMES = ("wte",)
"""The token embedding (``transformer.wte``); with a tied head (llama2.c's models) the head's weight is the same."""
NORM_NAMES = ("norm_1", "norm_2", "ln_f")
"""Every RMSNorm weight: the two of each block and the final one."""


SWITCH = "peft_enabled"
"""The flag (a class attribute, True) of every module that adds a method's contribution; False: pass through."""


@contextlib.contextmanager
def switched_off(model: nn.Module) -> Iterator[List[nn.Module]]:
    """Inside, every module of ``model`` carrying :data:`SWITCH` computes what the base layer alone would; the
    modules switched off are yielded. Their tensors are untouched, so leaving the block restores the method."""
    modules = [m for m in model.modules() if getattr(m, SWITCH, None) is True]
    for module in modules:
        setattr(module, SWITCH, False)
    try:
        yield modules
    finally:
        for module in modules:
            setattr(module, SWITCH, True)


def has_name_part(name: str, parts: Tuple[str, ...]) -> bool:
    """Whether one of the dotted components of the tensor name ``name`` is in ``parts``."""
    return any(part in parts for part in name.split("."))


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

    def memory_terms(self, settings: Any) -> TrainedParts:
        raise NotImplementedError(f"{self.name} declares no memory terms")

    def prepare_for_inference(self, model: nn.Module) -> None:
        """Called once the trained tensors are loaded, before evaluation or generation."""

    def initialize_from_base(self, model: nn.Module, settings: Any, checkpoint_dir: Path) -> None:
        """Called once the base weights are loaded and the added tensors initialised: a method may derive initial
        values from the base checkpoint (prompt tuning's text initialisation reads its tokenizer and embedding)."""

    def final_tensors(self, model: nn.Module, settings: Any) -> Tuple[Dict[str, torch.Tensor], Any]:
        """What ``final/`` stores and the settings that rebuild a model around it: by default the trainable tensors
        and the training settings; a method may fold a training-only reparameterisation away (P-tuning's encoder,
        prefix tuning's MLP) and return the settings of the folded form."""
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if self.trainable(n, p, settings)}
        return tensors, settings

    def switched_off(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which ``model`` computes the base model's function: the method's modules pass through.

        Only the method's *added* modules are switched; base tensors it trains in place (Adapter v2's norms, full
        fine-tuning's weights) stay as trained, so a caller that needs the base needs its own copy of those.
        """
        return switched_off(model)

    def __repr__(self) -> str:
        return f"<method {self.name}>"
