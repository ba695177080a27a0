"""A run's adapter in HF PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads.

Which PEFT type a run becomes, and its tensors, the run's method says (``tuners.base.Method.peft_adapter``: LoRA
a ``LoraConfig``, IA³ an ``IA3Config``, LLaMA-Adapter v1 an ``AdaptionPromptConfig``), or why PEFT has none
(``tuners.base.Refused``: Adapter v2, BitFit, bottleneck adapters, ...). This module holds what is the same for
every method:

* the HF model family's names (:class:`Layout`): our ``q_proj`` ... ``down_proj``, ``lm_head`` are HF LLaMA's;
  on GPT-2 (``GPT2LMHeadModel``) the modules are ``attn.c_attn`` (our q/k/v, fused: three slots of its output
  rows), ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``lm_head``, stored ``fan_in_fan_out``;
* the common config entries (``base_model_name_or_path``, ``task_type``, ...);
* the refusals no method decides: a full fine-tune (a whole model, not an adapter: ``scripts/convert_to_hf.py``),
  sparse attention (PEFT's base attends densely; ``lit_adapter.export``), and a trained tensor the adapter would
  not hold (LongLoRA's embedding and norms beside LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from lit_adapter.checkpoint import find_weights, load_state_dict
from lit_adapter.convert.common import lit_to_hf_name
from lit_adapter.convert.gpt2 import is_gpt2
from lit_adapter.errors import UserError
from lit_adapter.export.source import Source, StateDict
from lit_adapter.tuners.base import PeftTarget, Refused

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _refuse(source: Source, why: str) -> UserError:
    return UserError(f"PEFT cannot represent {source.label}: {why}")


def peft_module_name(name: str) -> str:
    """PEFT's key prefix of our module ``name``: ``base_model.model.`` + the HF module's name."""
    return "base_model.model." + lit_to_hf_name(f"{name}.weight")[: -len(".weight")]


_GPT2_MODULES = {"q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj",
                 "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
_GPT2_SLOTS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
"""Where our q/k/v are in the output rows of GPT-2's fused ``c_attn``."""


def gpt2_module_name(name: str) -> str:
    """HF GPT-2's module of our module ``name`` (``transformer.h.0.attn.k_proj`` -> ``transformer.h.0.attn.c_attn``)."""
    if name == "lm_head":
        return name
    prefix, _, leaf = name.rpartition(".")  # transformer.h.N.attn, k_proj
    return prefix.rpartition(".")[0] + "." + _GPT2_MODULES[leaf]


@dataclass
class Layout:
    """The HF family's side of a PEFT export (``tuners.base.PeftLayout``), for the methods' mappings."""

    family: str
    fan_in_fan_out: bool
    source: Optional[Source] = None

    def base_weight(self, name: str) -> torch.Tensor:
        if self.source is None or self.source.base_dir is None:
            raise Refused("its adapter depends on the base weights, and the base checkpoint is not there; pass "
                          "--checkpoint_dir")
        if self._base is None:
            self._base = load_state_dict(find_weights(self.source.base_dir))
        return self._base[f"{name}.weight"].float()

    def __post_init__(self) -> None:
        self._base: Optional[StateDict] = None

    def key(self, name: str) -> str:
        if self.family == "gpt2":
            return "base_model.model." + gpt2_module_name(name)
        return peft_module_name(name)

    def targets(self, names: Iterable[str]) -> List[PeftTarget]:
        gpt2 = self.family == "gpt2"
        groups: Dict[str, List[str]] = {}  # HF module -> our layers it holds, in model order
        for name in names:
            groups.setdefault(gpt2_module_name(name) if gpt2 else name, []).append(name)
        out = []
        for module, members in groups.items():
            leaves = [m.rpartition(".")[2] for m in members]
            fused = gpt2 and module.endswith(".attn.c_attn")
            # PEFT matches a target_modules entry against the end of the module's name
            entry = ".".join(module.split(".")[-2:]) if gpt2 and module != "lm_head" else leaves[0]
            out.append(PeftTarget(key=self.key(members[0]), name=entry, members=tuple(members),
                                  slots=tuple(_GPT2_SLOTS[leaf] for leaf in leaves) if fused else (0,),
                                  n_slots=len(_GPT2_SLOTS) if fused else 1))
        return out


def layout_of(source: Source) -> Layout:
    if not source.config.causal:  # RoBERTa's names and SEQ_CLS's modules_to_save are not mapped here yet
        raise UserError("exporting a run on an encoder (RoBERTa, BERT) as a PEFT adapter is not implemented")
    gpt2 = is_gpt2(source.config)
    return Layout("gpt2" if gpt2 else "llama", fan_in_fan_out=gpt2, source=source)


def _common(base_model_name_or_path: Optional[str]) -> Dict[str, Any]:
    return {"base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": "CAUSAL_LM",
            "inference_mode": True}


def peft_adapter(source: Source, base_model_name_or_path: Optional[str] = None) -> Tuple[Dict[str, Any], StateDict]:
    """``(adapter_config.json as a dict, tensors under PEFT's names)`` of ``source``'s run; refused when PEFT has
    no exact counterpart (see the module docstring)."""
    if source.spec is None:
        raise UserError("pass --adapter_dir: a PEFT adapter is exported from a fine-tuned run's final/ folder")
    if source.spec.definition.final_is_checkpoint:
        raise _refuse(source, "a full fine-tune is a whole model, not an adapter; export it with "
                              "scripts/convert_to_hf.py --adapter_dir ... --merge true")
    try:
        adapter = source.spec.definition.peft_adapter(source.model, source.spec.settings, layout_of(source))
    except Refused as why:
        raise _refuse(source, str(why)) from None
    left = sorted(set(source.trained) - adapter.carried)
    if left:  # a trained tensor PEFT would not receive: the adapter would be incomplete
        raise _refuse(source, f"its trained tensors {', '.join(left[:3])} have no place in the PEFT adapter")
    config = {"peft_type": adapter.config["peft_type"], **_common(base_model_name_or_path), **adapter.config}
    return config, {k: v.detach().contiguous() for k, v in adapter.tensors.items()}
