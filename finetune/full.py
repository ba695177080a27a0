"""Full fine-tuning of every LLaMA weight: the reference the PEFT methods are compared against."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("full")

if __name__ == "__main__":
    cli(setup)
