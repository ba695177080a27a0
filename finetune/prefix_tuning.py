"""Fine-tune a frozen LLaMA with prefix tuning (Li & Liang 2021): trained keys and values in every layer."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("prefix_tuning")

if __name__ == "__main__":
    cli(setup)
