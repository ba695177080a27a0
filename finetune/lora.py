"""Fine-tune a frozen LLaMA with LoRA (Hu et al. 2021); with --quantize bnb.nf4 this is QLoRA (Dettmers et al. 2023)."""

from lit_adapter.cli import cli, make_finetune_command
from lit_adapter.lora import LoRAConfig

setup = make_finetune_command(
    "lora",
    "lora",
    LoRAConfig,
    "Fine-tune a frozen LLaMA with LoRA (Hu et al. 2021): low-rank updates B @ A, scaled by alpha / r, on the "
    "chosen projections. With --quantize bnb.nf4 this is QLoRA (Dettmers et al. 2023).",
    learning_rate=3e-4,
)

if __name__ == "__main__":
    cli(setup)
