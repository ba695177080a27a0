"""Fine-tune a frozen LLaMA with Pfeiffer bottleneck adapters (Pfeiffer et al. 2021) after each block's MLP."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("pfeiffer")

if __name__ == "__main__":
    cli(setup)
