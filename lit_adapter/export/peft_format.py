"""A run's adapter in HF PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads.

Which PEFT type a run becomes is decided by the modules in its model (:func:`inspect_structure`), never by its
method's name:

* LoRA layers only: ``LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` by HF module
  name, which are ours: ``q_proj`` ... ``down_proj``, ``lm_head``). The tensors are PEFT's ``lora_A`` (r, in)
  and ``lora_B`` (out, r) as they are; PEFT scales by ``lora_alpha / r`` as we do.
  LoRA's variants set what their layer class declares (``peft_options``: DoRA ``use_dora`` with its magnitude
  saved as PEFT's ``lora_magnitude_vector``, rsLoRA ``use_rslora``; LoRA+ trains plain LoRA) or are refused
  with its ``peft_refusal`` (PiSSA, OLoRA: their A, B apply to a residual base).
* IA³ layers only: ``IA3Config`` (``target_modules``, ``feedforward_modules``); PEFT stores an output scale as
  (out, 1) and an input scale as (1, in).
* LLaMA-Adapter v1 prompts only: ``AdaptionPromptConfig``. PEFT's ``AdaptedAttention`` (peft/tuners/
  adaption_prompt/layer.py, read in the installed peft 0.21) computes what ours does on the layers it adapts: the
  prompt's keys and values through the layer's own ``k_proj``/``v_proj`` with no RoPE and no norm, queries with
  RoPE, a softmax over the prompt alone scaled by 1/sqrt(head_dim) with no mask, grouped keys repeated per query
  head (``repeat_interleave``, as ours), the gated result through ``o_proj`` added to the attention output (the
  same sum, ``o_proj`` being linear without bias in v1). It adapts the *top* ``adapter_layers`` layers, which are
  ours from ``start_layer`` on. The one difference is the gate: ours has one per head (``gating_factor``, shape
  (1, n_head, 1, 1)), PEFT's ``adaption_gate`` one per layer (shape (1,)). A run exports only if every layer's
  heads share one gate value exactly; otherwise the refusal names the layer.

On GPT-2 (``GPT2LMHeadModel``) the modules are HF's: ``attn.c_attn`` (our q/k/v, fused), ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``, ``lm_head``. Our separate q/k/v LoRA layers are exactly one LoRA on the fused
``c_attn``: ``A`` their ``A`` stacked ``(k r, in)``, ``B`` block-diagonal ``(3 n_embd, k r)`` (zero rows for a
projection not adapted), written with ``rank_pattern`` ``k r`` and ``alpha_pattern`` ``k alpha`` so PEFT's scale
``alpha / r`` is ours. IA³ output scales on q/k/v become one ``c_attn`` scale of ``3 n_embd`` (ones where not
adapted); an input scale on q/k/v (they share one input in ``c_attn``) and LLaMA-Adapter prompts are refused.

Everything else is refused with one line naming the method and why: Adapter v2 (PEFT has no per-linear bias and
scale, nor trained norms beside a prompt), BitFit (PEFT's ``bias`` options train biases a model has; LLaMA's
linears have none), Houlsby and Pfeiffer (bottleneck adapters are AdapterHub's, not PEFT's), full fine-tuning
(a whole model, not an adapter: ``scripts/convert_to_hf.py``), sparse attention (PEFT's base attends densely).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.convert.common import lit_to_hf_name
from lit_adapter.convert.gpt2 import is_gpt2
from lit_adapter.errors import UserError
from lit_adapter.export.merge import layer_span
from lit_adapter.export.source import Source, StateDict, inspect_structure
from lit_adapter.tuners import adapter
from lit_adapter.tuners.adapter_v2 import AdapterV2Linear
from lit_adapter.tuners.bitfit import BitFitLinear
from lit_adapter.tuners.ia3 import IA3Linear
from lit_adapter.tuners.lora import LoRALinear

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_NOT_IN_PEFT = {
    AdapterV2Linear: "PEFT has no per-linear bias and scale (LLaMA-Adapter v2's), nor trained norms beside a prompt",
    BitFitLinear: "PEFT has no BitFit: its bias options train the biases a model has, and LLaMA's linears have none",
}


def _refuse(source: Source, why: str) -> UserError:
    return UserError(f"PEFT cannot represent {source.label}: {why}")


def peft_module_name(name: str) -> str:
    """PEFT's key prefix of our module ``name``: ``base_model.model.`` + the HF module's name."""
    return "base_model.model." + lit_to_hf_name(f"{name}.weight")[: -len(".weight")]


_GPT2_MODULES = {"q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj",
                 "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


def gpt2_module_name(name: str) -> str:
    """HF GPT-2's module of our module ``name`` (``transformer.h.0.attn.k_proj`` -> ``transformer.h.0.attn.c_attn``)."""
    if name == "lm_head":
        return name
    prefix, _, leaf = name.rpartition(".")  # transformer.h.N.attn, k_proj
    return prefix.rpartition(".")[0] + "." + _GPT2_MODULES[leaf]


def _fused(source: Source, layers: Dict[str, nn.Module]) -> Dict[str, Dict[str, nn.Module]]:
    """Our layers grouped by the GPT-2 module that holds them, in model order."""
    groups: Dict[str, Dict[str, nn.Module]] = {}
    for name, module in layers.items():
        groups.setdefault(gpt2_module_name(name), {})[name] = module
    return groups


def _common(base_model_name_or_path: Optional[str]) -> Dict[str, Any]:
    return {"base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": "CAUSAL_LM",
            "inference_mode": True}


def _uniform(values: Dict[str, Any], what: str, source: Source) -> Any:
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise _refuse(source, f"its layers use different {what} ({distinct}); this exporter writes one")
    return distinct[0]


def _number(value: float) -> Any:
    return int(value) if float(value).is_integer() else float(value)


def _lora(source: Source, layers: Dict[str, nn.Module], base_model: Optional[str]) -> Tuple[Dict, StateDict]:
    r = _uniform({n: m.r for n, m in layers.items()}, "ranks", source)
    alpha = _uniform({n: float(m.alpha) for n, m in layers.items()}, "alphas", source)
    dropout = _uniform({n: float(getattr(m.lora_dropout, "p", 0.0)) for n, m in layers.items()}, "dropouts", source)
    refusal = next((m.peft_refusal for m in layers.values() if m.peft_refusal), None)
    if refusal:
        raise _refuse(source, refusal)
    # a variant's LoraConfig fields (use_rslora, use_dora), which its layer class declares
    options = dict(_uniform({n: tuple(sorted(m.peft_options.items())) for n, m in layers.items()}, "LoRA variants",
                            source))
    if is_gpt2(source.config):
        if options:
            raise _refuse(source, f"this exporter writes {', '.join(options)} for LlamaForCausalLM only")
        return _lora_gpt2(source, layers, base_model, r, alpha, dropout)
    targets = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))  # in model order, once each
    config = {
        "peft_type": "LORA", **_common(base_model), "r": r, "lora_alpha": _number(alpha), "lora_dropout": dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, **options,
    }
    tensors = {}
    for name in layers:
        prefix = peft_module_name(name)
        tensors[f"{prefix}.lora_A.weight"] = source.trained[f"{name}.lora_A"]  # (r, in), PEFT's lora_A Linear
        tensors[f"{prefix}.lora_B.weight"] = source.trained[f"{name}.lora_B"]  # (out, r)
        if f"{name}.lora_magnitude_vector" in source.trained:  # DoRA's m (out,): PEFT saves it without ".weight"
            tensors[f"{prefix}.lora_magnitude_vector"] = source.trained[f"{name}.lora_magnitude_vector"]
    return config, tensors


def _lora_gpt2(source: Source, layers: Dict[str, nn.Module], base_model: Optional[str], r: int, alpha: float,
               dropout: float) -> Tuple[Dict, StateDict]:
    d = source.config.n_embd
    tensors: StateDict = {}
    ranks: Dict[str, int] = {}
    for hf_module, members in _fused(source, layers).items():
        prefix = f"base_model.model.{hf_module}"
        As = [source.trained[f"{n}.lora_A"] for n in members]
        Bs = [source.trained[f"{n}.lora_B"] for n in members]
        if hf_module.endswith("c_attn"):  # stacked A, block-diagonal B over the q/k/v slots
            A = torch.cat(As, dim=0)  # (k r, in)
            B = torch.zeros(3 * d, A.shape[0], dtype=Bs[0].dtype)  # (3 n_embd, k r)
            for j, (n, b) in enumerate(zip(members, Bs)):
                slot = _QKV.index(n.rsplit(".", 1)[-1])
                B[slot * d:(slot + 1) * d, j * r:(j + 1) * r] = b
            ranks[hf_module.rsplit(".", 1)[-1]] = A.shape[0]
        else:
            A, B = As[0], Bs[0]
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    targets = list(dict.fromkeys(".".join(m.split(".")[-2:]) if m != "lm_head" else m for m in _fused(source, layers)))
    fused = sorted(set(ranks.values()))
    if len(fused) > 1:
        raise _refuse(source, f"its layers adapt different numbers of q/k/v projections ({fused} ranks on "
                              "c_attn); this exporter writes one rank for c_attn")
    rank_pattern = {"c_attn": fused[0]} if fused and fused[0] != r else {}
    config = {
        "peft_type": "LORA", **_common(base_model), "r": r, "lora_alpha": _number(alpha), "lora_dropout": dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: _number(alpha * v / r) for k, v in rank_pattern.items()},  # keeps alpha / r
    }
    return config, tensors


def _ia3_gpt2(source: Source, layers: Dict[str, nn.Module], base_model: Optional[str]) -> Tuple[Dict, StateDict]:
    d = source.config.n_embd
    tensors: StateDict = {}
    feedforward = []
    for hf_module, members in _fused(source, layers).items():
        prefix = f"base_model.model.{hf_module}"
        inputs = [n for n, m in members.items() if m.feedforward]
        if hf_module.endswith("c_attn"):
            if inputs:
                raise _refuse(source, f"it scales the input of {inputs[0].rsplit('.', 1)[-1]}, and GPT-2's q/k/v "
                                      "share one input in c_attn, where PEFT has one input scale for all three")
            scale = torch.ones(3 * d, dtype=next(iter(source.trained.values())).dtype)
            for n in members:
                slot = _QKV.index(n.rsplit(".", 1)[-1])
                scale[slot * d:(slot + 1) * d] = source.trained[f"{n}.ia3_l"]
            tensors[f"{prefix}.ia3_l"] = scale[:, None]
            continue
        (name, layer), = members.items()
        scale = source.trained[f"{name}.ia3_l"]
        tensors[f"{prefix}.ia3_l"] = scale[None, :] if layer.feedforward else scale[:, None]
        if layer.feedforward:
            feedforward.append(".".join(hf_module.split(".")[-2:]))
    targets = list(dict.fromkeys(".".join(m.split(".")[-2:]) for m in _fused(source, layers)))
    config = {"peft_type": "IA3", **_common(base_model), "target_modules": targets,
              "feedforward_modules": list(dict.fromkeys(feedforward)), "fan_in_fan_out": True,
              "init_ia3_weights": True, "modules_to_save": None}
    return config, tensors


def _ia3(source: Source, layers: Dict[str, nn.Module], base_model: Optional[str]) -> Tuple[Dict, StateDict]:
    if is_gpt2(source.config):
        return _ia3_gpt2(source, layers, base_model)
    targets = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
    feedforward = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in layers.items() if m.feedforward))
    config = {"peft_type": "IA3", **_common(base_model), "target_modules": targets,
              "feedforward_modules": feedforward, "fan_in_fan_out": False, "init_ia3_weights": True,
              "modules_to_save": None}
    tensors = {}
    for name, layer in layers.items():
        scale = source.trained[f"{name}.ia3_l"]
        # PEFT broadcasts an input scale over the input's last dim (1, in), an output scale over the output's
        tensors[f"{peft_module_name(name)}.ia3_l"] = scale[None, :] if layer.feedforward else scale[:, None]
    return config, tensors


def _adaption_prompt(source: Source, prompts: Dict[str, nn.Module], base_model: Optional[str]
                     ) -> Tuple[Dict, StateDict]:
    if is_gpt2(source.config):
        raise _refuse(source, "this exporter writes LLaMA-Adapter prompts for LlamaForCausalLM only; PEFT's GPT-2 "
                              "adaption prompt adds its own c_proj bias and query path, not checked to equal ours")
    n_layer = source.config.n_layer
    layers = sorted(int(name.split(".")[2]) for name in prompts)
    if layers != list(range(n_layer - len(layers), n_layer)):
        raise _refuse(source, f"its prompts are in layers {layers}, PEFT's adaption prompts in the top layers only")
    lengths = {name: m.adapter_wte.num_embeddings for name, m in prompts.items()}
    prompt_length = _uniform(lengths, "prompt lengths", source)
    tensors = {}
    for name in prompts:
        gates = source.trained[f"{name}.gating_factor"].flatten()  # (n_head,)
        if not torch.all(gates == gates[0]):
            raise _refuse(source, f"{layer_span([name])} has one gate per head ({gates.numel()} values from "
                                  f"{gates.min().item():.4g} to {gates.max().item():.4g}) and PEFT's "
                                  "AdaptionPromptConfig one gate per layer; only equal gates in every layer export")
        prefix = peft_module_name(f"{name}.q_proj")[: -len(".q_proj")]  # ...layers.N.self_attn
        tensors[f"{prefix}.adaption_prompt"] = source.trained[f"{name}.adapter_wte.weight"][None]  # (1, aT, n_embd)
        tensors[f"{prefix}.adaption_gate"] = gates[:1].clone()  # (1,)
    config = {"peft_type": "ADAPTION_PROMPT", **_common(base_model), "target_modules": "self_attn",
              "adapter_len": prompt_length, "adapter_layers": len(layers)}
    return config, tensors


def peft_adapter(source: Source, base_model_name_or_path: Optional[str] = None) -> Tuple[Dict[str, Any], StateDict]:
    """``(adapter_config.json as a dict, tensors under PEFT's names)`` of ``source``'s run; refused when PEFT has
    no exact counterpart (see the module docstring)."""
    if source.spec is None:
        raise UserError("pass --adapter_dir: a PEFT adapter is exported from a fine-tuned run's final/ folder")
    if source.spec.definition.final_is_checkpoint:
        raise _refuse(source, "a full fine-tune is a whole model, not an adapter; export it with "
                              "scripts/convert_to_hf.py --adapter_dir ... --merge true")
    structure = inspect_structure(source.model)
    if structure.unknown:
        raise _refuse(source, structure.unknown[0][1])
    kinds = {type(m) for m in structure.wrappers.values()}
    if not kinds and not structure.prompts:
        in_place = sorted(source.trained)
        raise _refuse(source, f"it trains base tensors in place ({', '.join(in_place[:2])}"
                              f"{' ...' if len(in_place) > 2 else ''}), which no PEFT adapter holds; merge it "
                              "into the base with scripts/convert_to_hf.py --merge true")
    for kind, why in _NOT_IN_PEFT.items():
        if kind in kinds:
            raise _refuse(source, why)
    if kinds and all(issubclass(kind, LoRALinear) for kind in kinds) and not structure.prompts:
        config, tensors = _lora(source, structure.wrappers, base_model_name_or_path)
    elif kinds == {IA3Linear} and not structure.prompts:
        config, tensors = _ia3(source, structure.wrappers, base_model_name_or_path)
    elif not kinds and structure.prompts and type(source.model) is adapter.GPT:
        config, tensors = _adaption_prompt(source, structure.prompts, base_model_name_or_path)
    else:
        raise _refuse(source, "it combines parts no single PEFT adapter type holds")
    used = _used_trained_keys(source, structure)
    left = sorted(set(source.trained) - used)
    if left:  # a trained tensor PEFT would not receive: the adapter would be incomplete
        raise _refuse(source, f"its trained tensors {', '.join(left[:3])} have no place in the PEFT adapter")
    return config, {k: v.detach().contiguous() for k, v in tensors.items()}


def _used_trained_keys(source: Source, structure) -> set:
    used = set()
    for name in structure.wrappers:
        used |= {k for k in source.trained if k.startswith(name + ".") and k.count(".") == name.count(".") + 1}
    for name in structure.prompts:
        used |= {f"{name}.gating_factor", f"{name}.adapter_wte.weight"}
    return used
