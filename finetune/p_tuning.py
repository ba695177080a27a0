"""Fine-tune a frozen LLaMA with P-tuning (Liu et al. 2021): virtual tokens computed by a trained prompt encoder."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("p_tuning")

if __name__ == "__main__":
    cli(setup)
