"""Fine-tune a frozen LLaMA with LLaMA-Adapter v1 (Zhang et al. 2023): gated adaption prompts in the top layers."""

from lit_adapter.adapter import AdapterConfig
from lit_adapter.cli import cli, make_finetune_command

setup = make_finetune_command(
    "adapter",
    "adapter",
    AdapterConfig,
    "Fine-tune a frozen LLaMA with LLaMA-Adapter v1 (Zhang et al. 2023): learnable prompts attended through a "
    "zero-initialised gate in every layer from adapter.start_layer on. Only prompts and gates train.",
    learning_rate=9e-3,
)

if __name__ == "__main__":
    cli(setup)
