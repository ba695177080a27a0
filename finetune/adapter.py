"""Fine-tune a frozen LLaMA with LLaMA-Adapter v1 (Zhang et al. 2023): gated adaption prompts in the top layers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.adapter import AdapterConfig  # noqa: E402
from lit_adapter.cli import cli, make_finetune_command  # noqa: E402

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
