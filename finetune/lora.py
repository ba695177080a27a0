"""Fine-tune a frozen LLaMA with LoRA (Hu et al. 2021); with --quantize bnb.nf4 this is QLoRA (Dettmers et al. 2023)."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("lora")

if __name__ == "__main__":
    cli(setup)
