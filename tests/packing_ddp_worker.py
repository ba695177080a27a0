"""Run by tests/test_packing.py: one step's gradient on two DDP CPU processes (gloo), for micro-batches of 1, 2 and
4, padded and packed; rank 0 saves ``{"<mbs>-<packing>": (loss, gradients)}`` to the path in argv[1]."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_adapter.train.fabric_setup import make_fabric  # noqa: E402
from test_packing import STEP_LENGTHS, examples, method_model, step_gradient  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    fabric = make_fabric("cpu", 2, "ddp", "32-true")
    fabric.launch()
    model = fabric.setup_module(method_model("lora"))
    results = {}
    for micro_batch_size in (1, 2, 4):
        for packing in (False, True):
            results[f"{micro_batch_size}-{packing}"] = step_gradient(fabric, model, examples(STEP_LENGTHS),
                                                                     micro_batch_size, packing)
    if fabric.global_rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
