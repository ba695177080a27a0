"""Fine-tune a frozen LLaMA with Houlsby bottleneck adapters (Houlsby et al. 2019) after attention and MLP."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("houlsby")

if __name__ == "__main__":
    cli(setup)
