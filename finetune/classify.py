"""Sequence classification with a linear head on the last token, trained with any registered method plus the head.

    python finetune/classify.py lora --checkpoint_dir checkpoints/Llama-2-7b --head.pad_id 0
    python finetune/classify.py lora --quantize bnb.nf4 ... --data.source nyu-mll/multi_nli \\
        --data.val_split validation_matched --data.test_split validation_mismatched        # QLoRA + head on MNLI
    python finetune/classify.py full --data.source my_pairs.jsonl ...   # premise/hypothesis/label records

The first argument is the method (adapter, adapter_v2, lora, full, ia3, bitfit, houlsby, pfeiffer); `<method> --help`
lists its options. See docs/classification.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.train.classification import command  # noqa: E402
from lit_adapter.cli.finetune import cli  # noqa: E402
from lit_adapter.tuners.registry import METHODS  # noqa: E402

commands = {name: command(name) for name in METHODS}

if __name__ == "__main__":
    cli(commands)
