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
* its terms for the memory estimator (:meth:`Method.memory_terms`, a
  :class:`~lit_adapter.memory.terms.MemoryTerms` that the estimator's walk asks at every linear, attention and
  sublayer output);
* what inference needs after loading (:meth:`Method.prepare_for_inference`, e.g. folding LoRA into the weights);
* optionally, initial values taken from the base checkpoint (:meth:`Method.initialize_from_base`) and a folded
  form of the trained tensors for ``final/`` (:meth:`Method.final_tensors`).
* how its contribution is switched off, leaving the base model's function (:meth:`Method.switched_off`: DPO's
  reference policy without a second copy of the weights). By default every module of the method that declares
  ``peft_enabled`` (:data:`SWITCH`) is told to pass through; a method's own modules check that flag.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.config import Config
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model import GPT


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

    def memory_terms(self, settings: Any) -> MemoryTerms:
        """What the memory estimator needs to know of this method under ``settings``: which base tensors train and
        what the method's own ops keep for backward (a subclass of :class:`MemoryTerms` in the method's module)."""
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
