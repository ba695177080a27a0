"""Direct Preference Optimization (Rafailov et al. 2023) on prompt/chosen/rejected pairs, with any registered method.

    python finetune/dpo.py lora --checkpoint_dir checkpoints/Llama-2-7b --data.source prefs.jsonl --dpo.beta 0.1
    python finetune/dpo.py lora --quantize bnb.nf4 ... --dpo.loss_type ipo          # IPO on a QLoRA policy
    python finetune/dpo.py full ... --dpo.reference_dir checkpoints/Llama-2-7b-sft  # a separate reference

The first argument is the method; `<method> --help` lists its options. See docs/dpo.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.cli.finetune import cli  # noqa: E402
from lit_adapter.train.dpo import command  # noqa: E402
from lit_adapter.tuners.registry import METHODS  # noqa: E402

commands = {name: command(name) for name in METHODS}

if __name__ == "__main__":
    cli(commands)
