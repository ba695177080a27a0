"""Fine-tune a frozen LLaMA with LoRA+ (Hayou et al. 2024): LoRA with B learning faster than A."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("loraplus")

if __name__ == "__main__":
    cli(setup)
