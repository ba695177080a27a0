"""Full fine-tuning of every LLaMA weight: the reference the PEFT methods are compared against."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.cli import cli, make_finetune_command  # noqa: E402

setup = make_finetune_command(
    "full",
    None,
    None,
    "Full fine-tuning: every weight of the model trains. The upper bound the PEFT methods are compared against; "
    "it needs the most memory (weights, gradients and two AdamW moments for every parameter).",
    learning_rate=3e-5,
    weight_decay=0.1,
)

if __name__ == "__main__":
    cli(setup)
