"""Answer an instruction with a base LLaMA and the tensors of a adapter_v2 fine-tuning run (out/adapter_v2/final)."""

from jsonargparse import CLI

from lit_adapter.errors import run_cli
from lit_adapter.cli.generate import instruction_command

if __name__ == "__main__":
    run_cli(CLI, instruction_command("adapter_v2"), as_positional=False)
