"""Fine-tune a frozen LLaMA with rsLoRA (Kalajdzievski 2023): LoRA scaled by alpha / sqrt(r)."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("rslora")

if __name__ == "__main__":
    cli(setup)
