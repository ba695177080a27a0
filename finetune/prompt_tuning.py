"""Fine-tune a frozen LLaMA with prompt tuning (Lester et al. 2021): a soft prompt in front of every sequence."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("prompt_tuning")

if __name__ == "__main__":
    cli(setup)
