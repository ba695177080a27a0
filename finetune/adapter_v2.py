"""Fine-tune a frozen LLaMA with LLaMA-Adapter v2 (Gao et al. 2023)."""

from lit_adapter.adapter import AdapterConfig
from lit_adapter.cli import cli, make_finetune_command

setup = make_finetune_command(
    "adapter_v2",
    "adapter",
    AdapterConfig,
    "Fine-tune a frozen LLaMA with LLaMA-Adapter v2 (Gao et al. 2023): v1's gated adaption prompts plus a "
    "learnable bias and scale on every linear layer's output and trainable RMSNorm weights.",
    learning_rate=9e-3,
)

if __name__ == "__main__":
    cli(setup)
