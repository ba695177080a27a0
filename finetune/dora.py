"""Fine-tune a frozen LLaMA with DoRA (Liu et al. 2024); with --quantize bnb.nf4 this is QDoRA."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("dora")

if __name__ == "__main__":
    cli(setup)
