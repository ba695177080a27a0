"""Fine-tune a frozen LLaMA with IA³ (Liu et al. 2022): learned scales of the keys, values and FFN activation."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("ia3")

if __name__ == "__main__":
    cli(setup)
