"""Fine-tune a frozen LLaMA with OLoRA (Büyükakyüz 2024): LoRA started at the weights' QR factors."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("olora")

if __name__ == "__main__":
    cli(setup)
