"""Fine-tune a frozen LLaMA with BitFit (Ben Zaken et al. 2021): only (added, zero-initialised) biases train."""

from lit_adapter.cli.finetune import cli, make_finetune_command

setup = make_finetune_command("bitfit")

if __name__ == "__main__":
    cli(setup)
