"""Fine-tune a frozen LLaMA with PiSSA (Meng et al. 2024): LoRA started at the weights' principal components."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("pissa")

if __name__ == "__main__":
    cli(setup)
