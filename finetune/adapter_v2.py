"""Fine-tune a frozen LLaMA with LLaMA-Adapter v2 (Gao et al. 2023)."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("adapter_v2")

if __name__ == "__main__":
    cli(setup)
