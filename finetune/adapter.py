"""Fine-tune a frozen LLaMA with LLaMA-Adapter v1 (Zhang et al. 2023): gated adaption prompts in the top layers."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("adapter")

if __name__ == "__main__":
    cli(setup)
