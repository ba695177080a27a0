"""Answer an instruction with a base LLaMA and any fine-tuning run's final/ (or best/) folder: the method, its
settings and the base's quantization are read from the folder's adapter_config.json."""

from jsonargparse import CLI

from lit_adapter.errors import run_cli
from lit_adapter.cli.generate import generate_instruction_answer

if __name__ == "__main__":
    run_cli(CLI, generate_instruction_answer, as_positional=False)
