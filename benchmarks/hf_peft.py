"""The HF transformers + PEFT side of the throughput benchmarks, and what their reports share.

Why one module: ``finetune_throughput.py`` (random tokens, fixed shapes) and ``dolly_throughput.py`` (the real
Dolly workload) must compare against the *same* HF configuration of each method, so it is written once:

* :func:`peft_model`: ``LlamaForCausalLM`` (SDPA attention) of our ``Config``'s shape, wrapped by
  ``peft.get_peft_model`` with ``LoraConfig`` (our LoRA defaults' rank, alpha, dropout and targets) or
  ``AdaptionPromptConfig`` (LLaMA-Adapter v1: our prompt length and adapted layers);
* PEFT has no LLaMA-Adapter v2, so for ``adapter_v2`` :func:`add_v2_parts` adds v2's other parts by hand on top of
  the adaption prompt: every linear of every layer and the head as ``scale * (linear(x) + bias)``, and the RMSNorm
  weights unfrozen, so both sides train the same parameter set;
* :func:`machine` and :func:`write_json`: the reports' header and their JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Dict

METHODS = ("lora", "adapter", "adapter_v2")


def method_settings(method: str):
    """Our defaults for ``method``, which the HF side copies."""
    from lit_adapter.tuners.adapter import AdapterConfig
    from lit_adapter.tuners.lora import LoRAConfig

    return LoRAConfig() if method == "lora" else AdapterConfig()


def peft_model(config, method: str, device: str, dtype, max_positions: int):
    """HF ``LlamaForCausalLM`` of ``config``'s shape (random weights, SDPA), configured by PEFT like our ``method``."""
    from peft import AdaptionPromptConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_query_groups,
        max_position_embeddings=max(c.block_size, max_positions), rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        tie_word_embeddings=c.tie_embeddings, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_config).to(device=device, dtype=dtype)
    s = method_settings(method)
    if method == "lora":
        peft_config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_names(),
                                 task_type="CAUSAL_LM")
    else:  # PEFT adapts the top adapter_layers layers: ours from start_layer on
        peft_config = AdaptionPromptConfig(adapter_len=s.prompt_length, adapter_layers=c.n_layer - s.start_layer,
                                           task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config)
    if method == "adapter_v2":
        add_v2_parts(model)
    return model


def base_llama(peft_model):
    """The ``LlamaForCausalLM`` inside a PEFT model."""
    return peft_model.base_model.model if hasattr(peft_model.base_model, "model") else peft_model.base_model


def add_v2_parts(peft_model) -> None:
    """LLaMA-Adapter v2's bias, scale and norm training on top of PEFT's adaption prompt (v1)."""
    import torch
    import torch.nn as nn

    class BiasScaleLinear(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.bias_v2 = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
            self.scale_v2 = nn.Parameter(torch.ones(linear.out_features, dtype=linear.weight.dtype))

        @property
        def weight(self):  # PEFT's adaption prompt reads q_proj.weight.dtype
            return self.linear.weight

        def forward(self, x):
            return self.scale_v2 * (self.linear(x) + self.bias_v2)

    base = base_llama(peft_model)
    for layer in base.model.layers:
        attn = getattr(layer.self_attn, "model", layer.self_attn)  # PEFT wraps the attention of adapted layers
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, BiasScaleLinear(getattr(attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, BiasScaleLinear(getattr(layer.mlp, name)))
        layer.input_layernorm.weight.requires_grad_(True)
        layer.post_attention_layernorm.weight.requires_grad_(True)
    base.model.norm.weight.requires_grad_(True)
    base.lm_head = BiasScaleLinear(base.lm_head)


def machine() -> Dict[str, str]:
    """The CPU, core count, library versions, commit, date and load average a report states."""
    import peft
    import torch
    import transformers

    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def run_worker(script: str, mode: str, job: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """Runs ``script mode JSON(job)`` in a fresh process and returns the JSON of its ``RESULT`` line."""
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, script, mode, json.dumps(job)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{job.get('framework', 'interleaved')} {job['method']} failed:\n{proc.stderr[-3000:]}")


def write_json(path: Path, obj: Dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # e.g. --out_json out/throughput/run.json on a fresh checkout
    path.write_text(json.dumps(obj, indent=2) + "\n")
