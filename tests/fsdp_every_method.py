"""Run by tests/test_distributed.py on 2 gloo processes: every registered method, sharded by
``--fabric.strategy fsdp``'s ``parallelize_fn``, takes one optimizer step of the engine's ``Trainer`` and writes its
consolidated ``final/`` folder; or its spec refuses in one line. Rank 0 prints one JSON line per method."""

import itertools
import json
import sys
from pathlib import Path

import torch

from lit_adapter.errors import UserError
from lit_adapter.train import sharding
from lit_adapter.train.fabric_setup import make_fabric
from lit_adapter.train.trainer import Trainer, method_optimizer
from lit_adapter.tuners import registry as methods


def main(checkpoint_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    fabric = make_fabric("cpu", 2, "fsdp", "32-true")
    fabric.launch()
    config = methods.resolve_config(checkpoint_dir, None)
    for name in sorted(methods.REGISTRY):
        fabric.seed_everything(0)
        spec = methods.MethodSpec(name)
        try:
            spec.validate(config)
            spec.check_shardable()
        except UserError as err:
            fabric.print(json.dumps({"method": name, "status": "refused", "reason": str(err)}))
            continue
        model = methods.prepare_model(spec, config, checkpoint_dir, device=torch.device("cpu"), dtype=torch.float32)
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(method_optimizer(methods.unwrap(model), spec, "adamw", 1e-3, 0.0,
                                                             (0.9, 0.95)))
        batch = torch.randint(1, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        trainer = Trainer(fabric, model, optimizer, itertools.repeat({"input_ids": batch, "labels": batch}))
        loss = trainer.step().loss
        plain = sharding.consolidated_model(model, spec, config)
        if fabric.global_rank == 0:
            methods.save_adapter_folder(plain, spec, config, checkpoint_dir, out / name)
        fabric.barrier()
        fabric.print(json.dumps({"method": name, "status": "ok", "loss": loss}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
