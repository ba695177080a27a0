"""Full fine-tuning of every LLaMA weight: the reference the PEFT methods are compared against."""

from lit_adapter.cli import cli, make_finetune_command

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
